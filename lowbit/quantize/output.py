"""Writing a quantized model: checkpoint + tokenizer + quantize_report.json, atomically.

Everything is written into a staging directory beside the target and renamed into place only when
complete (quantize/destination.py), so an interrupted or failed run never leaves a partial output directory
and never loses the previous one. The files are a pure
function of the inputs (no timestamps, sorted JSON), so the same inputs give byte-identical outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import lowbit
from lowbit.formats.checkpoint import LayerScheme, OnlineTransform, build_quantization_config, weights_size
from lowbit.formats.shards import ShardWriter
from lowbit.formats.scheme import ActScheme
from lowbit.kernels.online import ONLINE_LOCATIONS, OnlineHadamard
from lowbit.models.arch import arch_table
from lowbit.models.attention import KV_ATTR
from lowbit.formats.storage import FLOAT_SCALES
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quantize.destination import REPORT_FILE, move_into_place
from lowbit.quantize.recipe import Recipe
from lowbit.quantize.resume import RunState
from lowbit.quantize.results import LayerResult



def checkpoint_tensors(model: PreTrainedModel) -> dict[str, Any]:
    """The model's state dict minus the tied ``lm_head.weight`` (safetensors stores shared tensors once)."""
    sd = model.state_dict(keep_vars=True)
    if getattr(model.config, "tie_word_embeddings", False):
        for name, _ in model.named_modules():
            if name.endswith("lm_head"):
                sd.pop(f"{name}.weight", None)
    return sd


def write_tensors(model: PreTrainedModel, state: RunState, directory: Path, max_shard_size: int) -> None:
    """The checkpoint's tensors in the model's order, sharded (formats/shards.py): each decoder block's from the file
    the run saved when the block was finished (its modules are back on the meta device), the others from the head
    file saved before the block loop if there is one (quantize/resume.py), else from ``model``."""
    blocks = arch_table(model.config.model_type).blocks
    writer = ShardWriter(directory, max_shard_size)
    current: tuple[int, Any] | None = None
    with ExitStack() as stack, ExitStack() as head_stack:
        head = head_stack.enter_context(safe_open(str(state.head_file), framework="pt")) if state.head_file.is_file() else None
        for name, tensor in checkpoint_tensors(model).items():
            if name.startswith(blocks + "."):
                i = int(name[len(blocks) + 1 :].split(".", 1)[0])
                if current is None or current[0] != i:
                    stack.close()
                    current = (i, stack.enter_context(safe_open(str(state.block_file(i)), framework="pt")))
                tensor = current[1].get_tensor(name)
            elif head is not None:
                tensor = head.get_tensor(name)
            writer.add(name, tensor)
        writer.close()


def layer_schemes(model: nn.Module) -> tuple[dict[str, LayerScheme], list[str]]:
    """(quantized linear name -> scheme, names of the linears left in float)."""
    layers, ignore = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = LayerScheme(m.scheme, m.act, m.format, m.weight_scale.dtype if m.format in FLOAT_SCALES else None)
        elif isinstance(m, nn.Linear):
            ignore.append(name)
    return layers, ignore


def online_transforms(model: nn.Module) -> list[OnlineTransform]:
    """The model's online transforms (``<group>_<location>`` children, kernels/online.py), one record per
    (group, location), targets in module order."""
    found: dict[tuple[str, str, str, int], list[str]] = {}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            location = next((loc for loc in ONLINE_LOCATIONS if child_name.endswith("_" + loc)), None)
            if isinstance(child, OnlineHadamard) and location is not None:
                group = child_name[: -len(location) - 1]
                found.setdefault((group, child.kind, location, child.block), []).append(name)
    return [OnlineTransform(g, kind, loc, tuple(names), block) for (g, kind, loc, block), names in found.items()]


def kv_cache(model: PreTrainedModel) -> tuple[ActScheme, int] | None:
    """The model's KV-cache scheme and head_dim (one scheme for every attention module), or None."""
    schemes = {getattr(m, KV_ATTR, None) for m in model.modules() if hasattr(m, KV_ATTR)}
    schemes.discard(None)
    if not schemes:
        return None
    return schemes.pop(), arch_table(model.config.model_type).geometry(model.config.to_dict()).head_dim


def report_dict(recipe: Recipe, layers: list[LayerResult], model_dir: Path, calib: dict[str, Any]) -> dict[str, Any]:
    """The deterministic content of quantize_report.json (no wall times: those go to the terminal)."""
    n_params = sum(l.params for l in layers)
    return {
        "lowbit_version": lowbit.__version__,
        "model": model_dir.name,
        "recipe": recipe.to_dict(),
        "calibration": calib,
        "bits_per_weight": sum(l.storage_bits for l in layers) / max(n_params, 1),
        "quantized_params": n_params,
        "float_bytes": weights_size(model_dir),
        "layers": [{**asdict(l), "bits_per_weight": l.bits_per_weight} for l in layers],
    }


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give it and its files the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def write_output(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    recipe: Recipe,
    layers: list[LayerResult],
    model_dir: Path,
    calib: dict[str, Any],
    overwrite: bool,
    extra: dict[str, Any] | None,
    state: RunState,
    max_shard_size: int,
) -> int:
    """Write the quantized ``model`` to ``out`` atomically (quantize/destination.py): assembled in the run's staging
    directory (``state``), whose resumable state is deleted once the checkpoint is complete, then renamed into place
    (on a failure the pipeline removes the staging directory, or keeps it for ``--resume``). Returns the size of its weight files in bytes."""
    out = out.resolve()
    tmp = state.staging
    for leftover in tmp.iterdir():  # what a killed write left in a resumed staging directory: written again below
        if leftover != state.directory:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    qlayers, ignore = layer_schemes(model)
    fallbacks = {l.name: l.fallback for l in layers if l.fallback}
    info = {"lowbit_version": lowbit.__version__, "recipe": recipe.to_dict(), "group_fallbacks": fallbacks}
    config = model.config.to_dict()
    config["quantization_config"] = build_quantization_config(
        qlayers, ignore, info, online_transforms(model), kv_cache(model)
    )
    write_tensors(model, state, tmp, max_shard_size)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and (model_dir / "generation_config.json").exists():
        shutil.copyfile(model_dir / "generation_config.json", tmp / "generation_config.json")
    report = {**report_dict(recipe, layers, model_dir, calib), **(extra or {})}
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    state.discard()
    size = weights_size(tmp)
    _apply_umask(tmp)
    move_into_place(tmp, out, overwrite)
    return size
