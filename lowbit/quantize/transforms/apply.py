"""Applying a recipe's transforms: the checks that need only the recipe or the model's config, the model-level
transforms after loading, and the block-level ones through the staged runner's hook."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lowbit.calibrate.staged import StageHook
from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme
from lowbit.models.arch import ArchTable, Geometry
from lowbit.calibrate.runner import BlockInputs, run_block
from lowbit.models.attention import kv_cache_mode
from lowbit.quantize.transforms import BLOCK, BLOCK_TRAINED, MODEL, TRAINED, TRANSFORMS
from lowbit.models.loading import get_module
from lowbit.quantize.transforms.base import Scope, TrainContext
from lowbit.quantize.transforms.rotations import check_sizes
from lowbit.quantize.transforms.spec import TransformSpec


def check_recipe(specs: tuple[TransformSpec, ...], activations: ActScheme | None, kv_cache: ActScheme | None) -> None:
    """One line for a transform list that cannot work whatever the model: a repeat, a transform listed before one
    it needs, R3 without a quantized KV cache, SmoothQuant on a weight-only recipe."""
    seen: list[str] = []
    for spec in specs:
        if spec.name in seen:
            raise LowbitError(f"transform {spec.name!r} is listed twice")
        missing = [n for n in TRANSFORMS[spec.name].needs if n not in seen]
        if missing:
            raise LowbitError(f"transform {spec.name!r} needs {', '.join(missing)} listed before it")
        seen.append(spec.name)
    if sum(TRANSFORMS[n].level in (BLOCK, BLOCK_TRAINED) for n in seen) > 1:
        raise LowbitError("a recipe takes one block-level (data-dependent) transform")
    if "ost" in seen and ("r1" in seen or "r2" in seen):
        raise LowbitError("transform 'ost' learns R1 and R2 itself (from Hadamard or WOMI starts): drop r1/r2")
    if "ost" in seen and "r4" in seen and seen.index("r4") < seen.index("ost"):
        raise LowbitError("list r4 after ost: ost scales down_proj's input channels, which must happen before R4 rotates "
                          "them (ost simulates an r4 listed after it)")
    if "r3" in seen and kv_cache is None:
        raise LowbitError("transform 'r3' rotates Q and K for a quantized KV cache: set kv_cache, or drop r3 (it changes "
                          "nothing without one)")
    if "smoothquant" in seen and activations is None:
        raise LowbitError("transform 'smoothquant' migrates activation outliers into the weights: it needs quantized "
                          "activations (set activations), a weight-only recipe gains nothing from it")


def check_model(specs: tuple[TransformSpec, ...], table: ArchTable, config: dict[str, Any]) -> Geometry:
    """The model's geometry, or one line if a transform cannot apply to a model of this config (before loading)."""
    geometry = table.geometry(config)
    if geometry.heads % geometry.kv_heads:
        raise LowbitError(f"{geometry.heads} attention heads are not a multiple of {geometry.kv_heads} KV heads")
    for spec in specs:
        check_sizes(spec.name, geometry, spec.block)
    return geometry


def _options(spec: TransformSpec) -> dict[str, Any]:
    return {o: getattr(spec, o) for o in TRANSFORMS[spec.name].options}


def apply_model_transforms(
    model: PreTrainedModel, table: ArchTable, geometry: Geometry, specs: tuple[TransformSpec, ...],
    ctx: TrainContext | None = None,
) -> dict[str, Any]:
    """Apply the model-level and trained transforms of ``specs`` to the float ``model`` in place, in order.

    ``ctx`` (the run's data and quantizers) is needed by trained transforms; returns their reports by name.
    """
    reports: dict[str, Any] = {}
    everything = Scope(True, tuple(get_module(model, table.blocks)))
    for k, spec in enumerate(specs):
        entry = TRANSFORMS[spec.name]
        if entry.level == MODEL:
            with torch.no_grad():
                entry.fn(model, table, geometry, everything, **_options(spec))
        elif entry.level == TRAINED:
            if ctx is None:
                raise LowbitError(f"transform {spec.name!r} trains on calibration data: it runs inside quantize model")
            later = dataclasses.replace(ctx, later=specs[k + 1 :])
            reports[spec.name] = entry.fn(model, table, geometry, later, **_options(spec))
    return reports


def streams(specs: tuple[TransformSpec, ...]) -> bool:
    """Whether the model-level part of ``specs`` can be applied to a model read block by block: no trained transform
    (those learn over every block at once)."""
    return all(TRANSFORMS[s.name].level != TRAINED for s in specs)


def apply_head_transforms(model: PreTrainedModel, table: ArchTable, geometry: Geometry, specs: tuple[TransformSpec, ...]) -> None:
    """The model-level transforms of ``specs``, in order, on the modules outside the decoder blocks only."""
    _apply_scoped(model, table, geometry, specs, Scope(True, ()))


def apply_block_transforms(
    model: PreTrainedModel, table: ArchTable, geometry: Geometry, specs: tuple[TransformSpec, ...], block: nn.Module
) -> None:
    """The model-level transforms of ``specs``, in order, on one decoder ``block`` just read (the same edit the whole
    model gets from :func:`apply_model_transforms`)."""
    _apply_scoped(model, table, geometry, specs, Scope(False, (block,)))


def _apply_scoped(
    model: PreTrainedModel, table: ArchTable, geometry: Geometry, specs: tuple[TransformSpec, ...], scope: Scope
) -> None:
    if not streams(specs):
        raise LowbitError("a trained transform needs the whole model: it cannot be applied block by block")
    with torch.no_grad():
        for spec in specs:
            entry = TRANSFORMS[spec.name]
            if entry.level == MODEL:
                entry.fn(model, table, geometry, scope, **_options(spec))


def stage_hook(
    block: nn.Module, table: ArchTable, geometry: Geometry, specs: tuple[TransformSpec, ...]
) -> StageHook | None:
    """The staged runner's hook for ``block`` from the recipe's block-level transform, or None (check_recipe allows
    one: a second would have to measure the input the first one changed)."""
    for s in specs:
        if TRANSFORMS[s.name].level == BLOCK:
            return TRANSFORMS[s.name].fn(block, table, geometry, **_options(s))
    return None


def block_trained(specs: tuple[TransformSpec, ...]) -> TransformSpec | None:
    """The recipe's block-trained transform (AffineQuant), if it has one."""
    return next((s for s in specs if TRANSFORMS[s.name].level == BLOCK_TRAINED), None)


def float_block_outputs(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The float ``block`` (KV cache not quantized) on the float stream ``hidden``: a block-trained transform's targets."""
    with kv_cache_mode(list(block.modules()), quantize=False):
        return run_block(block, BlockInputs(hidden, kwargs))


def train_block(
    block: nn.Module, table: ArchTable, geometry: Geometry, spec: TransformSpec, inputs: BlockInputs,
    fp_out: list[torch.Tensor], ctx: TrainContext,
) -> dict[str, Any]:
    """Run the block-trained transform ``spec`` on ``block`` before it is rounded; its report."""
    return TRANSFORMS[spec.name].fn(block, table, geometry, inputs, fp_out, ctx, **_options(spec))
