"""The pipeline: calibrate -> (transform) -> round -> pack, one decoder block at a time.

For each block: for every true-sequential sub-group of linears, collect the input Hessian if the
rounding method needs it (with the earlier sub-groups already quantized), round the sub-group and swap
in QuantLinear modules; then run the quantized block once more, whose outputs are the next block's
inputs (errors propagate, as in the GPTQ reference) and whose input statistics give each layer's
relative output error for the report.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrate.runner import BlockInputs, capture_block_inputs, run_block
from lowbit.calibrate.sources import calibration_texts
from lowbit.calibrate.stats import InputStats, relative_output_error
from lowbit.calibrate.windows import calibration_windows
from lowbit.errors import LowbitError
from lowbit.formats.scheme import WeightScheme
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.arch import ArchTable
from lowbit.models.loading import get_module, load_float_model, set_module
from lowbit.quantize.output import write_output
from lowbit.quantize.recipe import Recipe, load_recipe
from lowbit.quantize.rounding import ROUNDERS, RoundingMethod


@dataclass
class LayerResult:
    """What happened to one linear: the scheme applied, its storage cost and its error."""

    name: str
    shape: tuple[int, int]
    bits: int
    strategy: str
    group_size: int | None
    fallback: str | None
    storage_bits: int
    weight_rel_err: float
    output_rel_err: float

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantizeResult:
    """What ``quantize_model`` returns: where the output is and the numbers of the summary."""

    out: Path
    recipe: Recipe
    layers: list[LayerResult]
    size_before: int
    size_after: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits (codes, scales, zero points) per parameter of the quantized linears."""
        return sum(l.storage_bits for l in self.layers) / max(sum(l.params for l in self.layers), 1)


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """True if module ``name`` matches a recipe ignore pattern (a name, a ``.``-suffix, or ``re:regex``)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _fallback_note(requested: WeightScheme, applied: WeightScheme, in_features: int) -> str | None:
    if requested == applied:
        return None
    if applied.strategy == "channel":
        return f"group {requested.group_size} does not divide in_features {in_features}: per-channel scales"
    return f"group {requested.group_size} does not divide in_features {in_features}: group {applied.group_size}"


def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs,
    table: ArchTable,
    recipe: Recipe,
    method: RoundingMethod,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[LayerResult]]:
    """Quantize the linears of one block in place; return the block's outputs and the per-layer results."""
    names = [n for n in table.linears if not is_ignored(f"{prefix}.{n}", recipe.ignore)]
    groups = [g for g in ([n for n in group if n in names] for group in table.sequential) if g]
    originals: dict[str, torch.Tensor] = {}
    hessians: dict[str, torch.Tensor] = {}
    schemes: dict[str, WeightScheme] = {}
    device = inputs.hidden[0].device
    for group in groups:
        if method.needs_hessian:  # inputs as seen with the earlier sub-groups already quantized
            first = get_module(block, group[0])
            acc = InputStats(first.in_features, device)
            run_block(block, inputs, {group[0]: acc}, {group[0]: first}, keep_outputs=False)
            hessians.update({n: acc.hessian() for n in group})
        for n in group:
            linear = get_module(block, n)
            W = linear.weight.data
            originals[n] = W
            schemes[n] = recipe.weights.for_layer(W.shape[1])
            qw = method.fn(W, hessians.get(n), schemes[n], dtype)
            bias = linear.bias.data if linear.bias is not None else None
            set_module(block, n, QuantLinear.from_quantized(qw, recipe.activations, dtype, bias).to(device))
    # Final pass on the quantized block: its outputs feed the next block. For methods that collected no
    # Hessian, hooks gather each sub-group's (true-sequential) input statistics for the error report.
    stats = {} if method.needs_hessian else {g[0]: InputStats(get_module(block, g[0]).in_features, device) for g in groups}
    outputs = run_block(block, inputs, stats, {g[0]: get_module(block, g[0]) for g in groups})
    for g in groups:
        if g[0] in stats:
            hessians.update({n: stats[g[0]].hessian() for n in g})
    results = []
    for n in names:
        ql = get_module(block, n)
        W, W_hat = originals[n], ql.dequantized_weight()
        results.append(
            LayerResult(
                name=f"{prefix}.{n}",
                shape=(ql.out_features, ql.in_features),
                bits=schemes[n].bits,
                strategy=schemes[n].strategy,
                group_size=schemes[n].group_size,
                fallback=_fallback_note(recipe.weights, schemes[n], ql.in_features),
                storage_bits=ql.quantized_weight().storage_bits(),
                weight_rel_err=float((W.float() - W_hat.float()).norm() / W.float().norm().clamp_min(1e-30)),
                output_rel_err=relative_output_error(W, W_hat, hessians[n]),
            )
        )
        ql._w_hat = None  # free the dequantized copy; the packed codes are what is kept
    return outputs, results


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
) -> QuantizeResult:
    """Quantize a Hugging Face causal LM and write a compressed-tensors checkpoint to ``out``.

    Args:
        model: a local HF directory, or None / "smollm2-135m" for the bundled default model.
        recipe: a preset name, a recipe file path, or a Recipe.
        out: output directory; written to a temporary directory beside it and renamed into place.
        calib: calibration text (.txt, .json, .jsonl, or a saved ``datasets`` dataset); default per
            ``lowbit.calibrate.sources``.
        samples, calib_seqlen: number and length of the calibration windows.
        seed: seeds the window sampling and torch.
        device: where each block is processed ("cpu" or "cuda"); the model itself stays on the CPU.
        overwrite: replace an existing ``out``.
        batch_size: calibration windows per forward call.
        progress: show progress bars.
    """
    t0 = time.perf_counter()
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} already exists; pass --overwrite to replace it")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    method = ROUNDERS[recipe.method]
    torch.manual_seed(seed)
    texts = calibration_texts(calib)  # read before the (slow) model load so a bad --calib fails fast
    fmodel, tokenizer, table, model_dir = load_float_model(model)
    windows = calibration_windows(texts, tokenizer, samples, calib_seqlen, seed)
    dtype = next(fmodel.parameters()).dtype
    size_before = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))

    inputs = capture_block_inputs(fmodel, table, windows, batch_size, device)
    blocks = get_module(fmodel, table.blocks)
    layers: list[LayerResult] = []
    bar = tqdm(range(len(blocks)), desc=f"quantize {recipe.name}", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(device)
        outputs, results = quantize_block(block, f"{table.blocks}.{i}", inputs, table, recipe, method, dtype)
        blocks[i] = block.to("cpu")
        inputs.hidden = outputs
        layers.extend(results)
        bar.set_postfix(worst=f"{max(r.output_rel_err for r in results):.3f}" if results else "-")
    del inputs

    calib_info = {"source": str(calib) if calib else "default", "samples": samples, "seqlen": calib_seqlen, "seed": seed}
    size_after = write_output(fmodel, tokenizer, out, recipe, layers, model_dir, calib_info, overwrite)
    return QuantizeResult(out, recipe, layers, size_before, size_after, time.perf_counter() - t0)
