"""The pipeline: transform -> calibrate -> round -> pack, one decoder block at a time.

The float model is read from its safetensors files one block at a time (models/lazy.py): the recipe's model-level
transforms (rotations, quantize/transforms/) edit the modules outside the blocks once and each block as it is read,
so calibration and rounding see the transformed model; recipes that train or allocate bits over the whole model
(trained transforms, trained rounding, BAQ) read every block first. Block-level transforms (SmoothQuant) run
inside the staged runner, through its hook, just before a norm's output is measured and consumed.

For each block, the staged runner (calibrate/staged.py) walks the calibration batches through the block
one true-sequential sub-group at a time; as soon as a sub-group's input Hessian is complete, its linears
are rounded and swapped for QuantLinear modules, so later sub-groups and the block's outputs (the next
block's inputs) see the quantized ones: errors propagate, as in the GPTQ reference, in one pass. The finished
block's tensors and the next block's inputs are saved in the staging directory (quantize/resume.py: ``--resume``),
the block is released, and the output's shards are assembled from those files at the end (quantize/output.py).
Under torchrun each process runs its share of the batches (lowbit/distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrate.runner import capture_block_inputs
from lowbit.calibrate.sources import calibration_texts
from lowbit.calibrate.stats import exact_math
from lowbit.calibrate.windows import calibration_windows
from lowbit import distributed, native
from lowbit.memory import limit_heap_fragmentation, release_free_heap
from lowbit.distributed import Ranks, batch_share
from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import weights_size
from lowbit.formats.precision import Precision
from lowbit.formats.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from lowbit.formats.scheme import WeightScheme
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.kernels.online import INPUT, online_child
from lowbit.models.arch import Geometry, arch_table
from lowbit.models.attention import attention_modules, install_attention
from lowbit.models.lazy import LazyModel, open_lazy_model
from lowbit.models.loading import check_model_dir, get_module, model_path, resolve_model_dir, set_module
from lowbit.native import gptq_columns
from lowbit.quantize.allocation import bit_allocation
from lowbit.quantize.block import model_scheme, quantize_block
from lowbit.quantize.destination import check_destination
from lowbit.quantize.finetune import Settings, Start, finetune
from lowbit.quantize.methods import TRAINERS
from lowbit.quantize.output import checkpoint_tensors, write_output
from lowbit.quantize.recipe import Recipe, load_recipe
from lowbit.quantize.resume import RunState, fingerprint
from lowbit.quantize.results import LayerResult, QuantizeResult
from lowbit.quantize.transforms.apply import (
    apply_block_transforms, apply_head_transforms, apply_model_transforms, block_trained, check_model,
    float_block_outputs, streams, train_block,
)
from lowbit.quantize.transforms.base import TrainContext


def check_run_args(samples: int, calib_seqlen: int, batch_size: int) -> None:
    """One-line errors for run sizes that cannot work (the model's own limit is checked once its config is read)."""
    for name, value, least in (("--samples", samples, 1), ("--calib-seqlen", calib_seqlen, 2), ("--batch-size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LowbitError(f"{name} must be an integer >= {least}, got {value!r}")


CALIB_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def calibration_autocast(calib_dtype: str, device: str) -> contextlib.AbstractContextManager[None]:
    """The context the calibration forward passes run in: bfloat16 autocast for ``--calib-dtype bfloat16`` (the
    linears and attention compute in bfloat16; weights, the residual stream, Hessians and rounding stay float32),
    nothing for float32."""
    dtype = CALIB_DTYPES[calib_dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def check_scale_args(calib_dtype: str, max_shard_size: str | int, world: int, recipe: Recipe, trained: bool, resume: bool) -> int:
    """One line for a --calib-dtype, --max-shard-size, process count or --resume the run cannot take; the shard
    size in bytes."""
    if calib_dtype not in CALIB_DTYPES:
        raise LowbitError(f"--calib-dtype {calib_dtype!r}: valid are {', '.join(CALIB_DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    learned = not streams(recipe.transforms) or block_trained(recipe.transforms) is not None
    if world > 1 and (trained or learned or recipe.baq is not None):
        raise LowbitError(f"{world} processes: recipe {recipe.name} trains (learned transforms, trained rounding) "
                          "or allocates bits (BAQ) over the whole model, which runs in one process; drop --nproc/torchrun")
    if resume and trained:
        raise LowbitError(f"--resume: recipe {recipe.name} trains its rounding over the whole model after the block loop, "
                          "which cannot resume; rerun without --resume")
    return shard_bytes


def block_tensors(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A finished block's tensors under their names in the model (``prefix`` = ``model.layers.3``)."""
    return {f"{prefix}.{k}": v for k, v in block.state_dict().items()}


def quantize_model(
    model: str | Path | None = None,
    recipe: str | Recipe = "w4a16",
    out: str | Path = "out",
    calib: str | Path | None = None,
    samples: int = 128,
    calib_seqlen: int = 512,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    avg_bits: float | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    resume: bool = False,
    calib_dtype: str = "float32",
) -> QuantizeResult:
    """Quantize a Hugging Face causal LM and write a compressed-tensors checkpoint to ``out``.

    The float model is read from its safetensors files one block at a time (models/lazy.py) unless the recipe
    trains over the whole model (learned model-level transforms, trained rounding, BAQ's allocation), and each
    finished block is written out at once: memory follows one block, not the model. Under torchrun (``WORLD_SIZE``
    > 1, lowbit/distributed.py) every process runs this with its share of the calibration batches; rank 0 writes.

    Args:
        model: a local HF directory, or None / "smollm2-135m" for the bundled default model.
        recipe: a preset name, a recipe file path, or a Recipe.
        out: output directory; written to a staging directory beside it and renamed into place
            (quantize/destination.py: what may be replaced, and leftovers of killed runs).
        calib: calibration text (.txt, .json, .jsonl, or a saved ``datasets`` dataset); default per
            ``lowbit.calibrate.sources``.
        samples, calib_seqlen: number and length of the calibration windows.
        seed: seeds the window sampling and torch.
        device: where each block is processed ("cpu" or "cuda"); the model itself stays on the CPU.
        overwrite: replace an existing ``out`` (an empty directory or a previous lowbit output only).
        batch_size: calibration windows per forward call.
        progress: show progress bars.
        avg_bits: override the average-bit budget of a BAQ recipe.
        max_shard_size: the largest weight file (``"50GB"``, ``"2GiB"``, bytes); a larger checkpoint is sharded.
        resume: continue the killed run of the same job beside ``out`` from its last finished block
            (quantize/resume.py).
        calib_dtype: "float32" or "bfloat16": the dtype the calibration forward passes compute in.
    """
    t0 = time.perf_counter()
    limit_heap_fragmentation()
    timings: dict[str, float] = {}
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if avg_bits is not None:
        recipe = recipe.with_avg_bits(avg_bits)
    out = Path(out)
    # Cheap checks first, each one line, so that bad input fails before the model is loaded and writes nothing.
    check_run_args(samples, calib_seqlen, batch_size)
    check_destination(out, overwrite, model_path(model))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    trainer = TRAINERS.get(recipe.method)
    shard_bytes = check_scale_args(calib_dtype, max_shard_size, distributed.world_size(), recipe, trainer is not None, resume)
    model_dir = resolve_model_dir(model)
    config = check_model_dir(model_dir)
    geometry = None  # the sizes the transforms need, checked before the model loads
    if recipe.transforms or recipe.kv_cache is not None:
        geometry = check_model(recipe.transforms, arch_table(str(config.get("model_type"))), config)
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and calib_seqlen > max_positions:
        raise LowbitError(f"--calib-seqlen {calib_seqlen} exceeds the model's max_position_embeddings ({max_positions})")
    settings = None if trainer is None else Settings.resolve(recipe.training, device, seed, trainer.cpu, trainer.cuda)
    if settings is not None and isinstance(max_positions, int) and settings.seqlen > max_positions:
        raise LowbitError(f"{recipe.method}: training seqlen {settings.seqlen} exceeds the model's max_position_embeddings "
                          f"({max_positions}); set training.seqlen in the recipe")
    texts = calibration_texts(calib)  # read before the (slow) model load so a bad --calib fails fast
    ranks = distributed.setup(device)
    device = ranks.device
    progress = progress and ranks.rank == 0
    lazy = open_lazy_model(model_dir)
    fmodel, tokenizer, table = lazy.model, lazy.tokenizer, lazy.table
    whole = trainer is not None or recipe.baq is not None or not streams(recipe.transforms)
    if whole:
        lazy.load_all()
    torch.manual_seed(seed)
    windows = calibration_windows(texts, tokenizer, samples, calib_seqlen, seed)
    release_free_heap()  # the tokenizer's temporaries over the whole text: ~250 MB that glibc would keep
    share = batch_share(windows.shape[0], batch_size, ranks)
    timings["load"] = time.perf_counter() - t0
    precision = recipe.precision(lazy.dtype)
    t1 = time.perf_counter()
    base = model_scheme(fmodel, table, recipe)
    trained: dict[str, object] = {}
    ctx = TrainContext(texts, tokenizer, base, recipe.activations, recipe.kv_cache, (), device, seed, progress)
    if recipe.kv_cache is not None:  # first: a trained transform simulates the KV quantizer
        install_attention(fmodel, [m for _, m in attention_modules(fmodel, table.blocks, table.attention)], recipe.kv_cache)
    if geometry is not None:
        if whole:
            trained = apply_model_transforms(fmodel, table, geometry, recipe.transforms, ctx)
        else:
            apply_head_transforms(fmodel, table, geometry, recipe.transforms)
        if trained:
            release_free_heap()  # the training's graphs were freed between live heap blocks: give the pages back
        torch.manual_seed(seed)  # what follows draws the same numbers with or without training before it
    timings["transform"] = time.perf_counter() - t1
    size_before = weights_size(model_dir)

    if progress and recipe.method == "gptq" and device == "cpu" and native.enabled() and not gptq_columns.available(precision.dtype):
        tqdm.write("note: GPTQ's C column loop could not be built (no C compiler: install gcc or set CC; or see "
                   "lowbit.native.BUILD_ERRORS): it runs in torch, the same results more slowly", file=sys.stderr)
    allocated, rates = None, None
    if recipe.baq is not None:
        t1 = time.perf_counter()
        allocated, rates = bit_allocation(fmodel, table, windows, recipe, base, precision, batch_size, device, progress)
        release_free_heap()
        timings["allocation"] = time.perf_counter() - t1
    run = {"recipe": recipe.to_dict(), "calib": str(calib), "samples": samples, "seqlen": calib_seqlen, "seed": seed,
           "batch_size": batch_size, "device": device.split(":")[0], "world": ranks.world, "calib_dtype": calib_dtype,
           "avg_bits": avg_bits}
    state = open_state(out, fingerprint(model_dir, texts, run), resume, progress, ranks)
    try:
        calib_info: dict[str, object] = {"source": str(calib) if calib else "default", "samples": samples,
                                         "seqlen": calib_seqlen, "seed": seed}
        if calib_dtype != "float32":
            calib_info["dtype"] = calib_dtype
        layers, block_reports, starts, loop_s, trained_s = _block_loop(
            lazy, windows[share], state, ranks, recipe, precision, base, allocated, timings, geometry, ctx,
            batch_size, calib_dtype, trainer is not None, whole, progress,
        )
        timings["blocks"] = loop_s - trained_s
        timings["transform"] += trained_s
        extra: dict[str, object] = {} if rates is None else {"baq_closed_form_rates": rates}
        if trainer is not None and starts is not None and settings is not None:
            t1 = time.perf_counter()
            release_free_heap()  # the rounding pass's freed Hessians and GPTQ buffers, before the training allocates
            report = finetune(fmodel, table, starts, trainer, settings, texts, tokenizer, device, progress)
            for r in layers:
                if r.name in starts:
                    W_hat = get_module(fmodel, r.name).quantized_weight().dequantize(torch.float32)
                    W = starts[r.name].weight.float()
                    r.weight_rel_err = float((W - W_hat).norm() / W.norm().clamp_min(1e-30))
                    r.output_rel_err = report.output_errors[r.name]
                    r.loss = None  # the start's objective says nothing about the trained codes
                    r.note = "; ".join(x for x in (r.note, f"{trainer.name}: codes trained from this start, output error "
                                                          "on the held-out windows") if x)
            del starts
            for i, block in enumerate(lazy.blocks):
                state.save_block(i, block_tensors(block, f"{table.blocks}.{i}"), ranks.rank)
                lazy.release_block(i)
            release_free_heap()
            extra["trained_rounding"] = report.to_dict()
            timings["training"] = time.perf_counter() - t1
        if block_reports:
            trained[block_trained(recipe.transforms).name] = block_reports  # type: ignore[union-attr]
        if trained:
            extra["trained_transforms"] = trained
        t1 = time.perf_counter()
        size_after = 0
        if ranks.rank == 0:  # the others are done (torchrun waits for every process; no collective here to time out)
            size_after = write_output(fmodel, tokenizer, out, recipe, layers, model_dir, calib_info, overwrite, extra,
                                      state, shard_bytes)
        timings["write"] = time.perf_counter() - t1
    except BaseException:
        keep = state.done > 0 and trainer is None and state.resumable()
        if not keep:
            shutil.rmtree(state.staging, ignore_errors=True)
        elif progress:
            tqdm.write(f"{state.done} finished blocks are kept in {state.staging}: rerun the same command with --resume "
                       "to continue from there", file=sys.stderr)
        raise
    finally:
        distributed.shutdown()
    return QuantizeResult(out, recipe, layers, size_before, size_after, time.perf_counter() - t0, extra, timings)


def open_state(out: Path, key: str, resume: bool, progress: bool, ranks: Ranks) -> RunState:
    """The run's staging directory and resumable state (rank 0 chooses it; the others are told where)."""
    state = RunState.begin(out, key, resume, progress) if ranks.rank == 0 else None
    staging, done, record = distributed.broadcast(
        None if state is None else (str(state.staging), state.done, state.record)
    )
    return state if state is not None else RunState(Path(staging), key, done, record)


def restore_block(
    lazy: LazyModel, i: int, results: list[LayerResult], recipe: Recipe, precision: Precision, geometry: Geometry | None,
) -> None:
    """Give a block finished by an earlier (killed) run the modules it had when it was saved, on the meta device: its
    tensors are in the run's block file; the output's config needs its layers' schemes and online transforms.

    The float block is read and transformed again (``geometry`` given: the model-level transforms per block) so that
    its online modules are those of the run; each rounded linear becomes a QuantLinear of the scheme its result
    names.
    """
    block = lazy.load_block(i)
    if geometry is not None:
        apply_block_transforms(lazy.model, lazy.table, geometry, recipe.transforms, block)
    for r in results:
        linear = get_module(lazy.model, r.name)
        scheme = dataclasses.replace(recipe.weights, bits=r.bits, strategy=r.strategy, group_size=r.group_size,
                                     symmetric=r.symmetric)
        if scheme.name != r.scheme:
            raise LowbitError(f"--resume: cannot rebuild {r.name} ({r.scheme}) from the recipe; drop --resume")
        with torch.device("meta"):
            ql = QuantLinear(linear.in_features, linear.out_features, scheme, recipe.activations, precision.dtype,
                             linear.bias is not None, scale_dtype=precision.scale_dtype)
        online = online_child(linear, INPUT)
        if online is not None:
            ql.set_input_transform(*online)
        set_module(lazy.model, r.name, ql)
    lazy.release_block(i)


def _block_loop(
    lazy: LazyModel, windows: torch.Tensor, state: RunState, ranks: Ranks, recipe: Recipe, precision: Precision,
    base: WeightScheme, allocated: dict[str, WeightScheme] | None, timings: dict[str, float], geometry: Geometry | None,
    ctx: TrainContext, batch_size: int, calib_dtype: str, keep_starts: bool, whole: bool, progress: bool,
) -> tuple[list[LayerResult], list[dict[str, object]], dict[str, Start] | None, float, float]:
    """Every block, from the first one ``state`` has not finished: read, transformed, rounded, saved, released.

    Returns (per-layer results of every block, block-trained transform reports, the trained rounding's starts or
    None, the loop's seconds, the block-trained transform's share of them).
    """
    t1 = time.perf_counter()
    fmodel, table, device = lazy.model, lazy.table, ranks.device
    inputs = capture_block_inputs(fmodel, table, windows, batch_size, device)
    if not keep_starts:  # the trained rounding needs the embedding and lm_head after the loop; else they wait on disk
        state.save_head({k: v for k, v in checkpoint_tensors(fmodel).items() if not k.startswith(table.blocks + ".")},
                        ranks.rank)
        lazy.release_head()
        release_free_heap()
    blocks = lazy.blocks
    layers: list[LayerResult] = state.layers()
    block_reports: list[dict[str, object]] = list(state.record["block_reports"])
    learner = block_trained(recipe.transforms)
    starts: dict[str, Start] | None = {} if keep_starts else None
    fp_stream = list(inputs.hidden) if learner is not None else None  # the float model's block inputs (targets)
    if 0 < state.done < len(blocks):
        hidden, saved = state.load_inputs(ranks.rank)
        inputs.hidden = [h.to(device) for h in hidden]
        fp_stream = None if saved is None else [h.to(device) for h in saved]
    if state.done:
        for i in range(state.done):
            restore_block(lazy, i, [r for r in layers if r.name.startswith(f"{table.blocks}.{i}.")], recipe, precision,
                          None if whole else geometry)
    trained_s = 0.0  # the block-trained transform's share of the loop: counted under "transform", not "blocks"
    bar = tqdm(range(state.done, len(blocks)), desc=f"quantize {recipe.name}", unit="block", disable=not progress,
               total=len(blocks), initial=state.done)
    for i in bar:
        block = lazy.load_block(i)
        if not whole and geometry is not None:
            apply_block_transforms(fmodel, table, geometry, recipe.transforms, block)
        block = block.to(device)
        prefix = f"{table.blocks}.{i}"
        with calibration_autocast(calib_dtype, device):
            if learner is not None and fp_stream is not None and geometry is not None:
                t2 = time.perf_counter()
                fp_stream = float_block_outputs(block, fp_stream, inputs.kwargs)
                with exact_math():  # the block-trained transform trains in float32, as the others
                    block_reports.append(train_block(block, table, geometry, learner, inputs, fp_stream, ctx))
                trained_s += time.perf_counter() - t2
            outputs, results = quantize_block(
                block, prefix, inputs, table, recipe, precision, base, allocated, timings, geometry, starts
            )
        blocks[i] = block.to("cpu")
        inputs.hidden = outputs
        layers.extend(results)
        bar.set_postfix(worst=f"{max(r.output_rel_err for r in results):.3f}" if results else "-")
        if keep_starts:
            continue  # the trained rounding changes every block's codes after the loop: saved then
        state.save_block(i, block_tensors(blocks[i], prefix), ranks.rank)
        if i + 1 < len(blocks):
            state.save_inputs(i + 1, ranks.rank, inputs.hidden, fp_stream)
        distributed.barrier()  # every rank's inputs of block i + 1 are on disk before the block counts as done
        state.commit(i + 1, layers, block_reports, ranks.rank)
        lazy.release_block(i)
        release_free_heap()  # the block's freed weights, Hessians and GPTQ buffers: the next block starts level
    del inputs
    return layers, block_reports, starts, time.perf_counter() - t1, trained_s
