"""Quantizing one decoder block: its linears rounded true-sequentially and swapped for QuantLinear modules.

The staged runner (calibrate/staged.py) calls back as each sub-group's input statistics are complete; the callback
rounds that sub-group (quantize/rounding.py) in float32 whatever the calibration dtype, and the later sub-groups
and the block's outputs see the quantized layers.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from lowbit.calibrate.runner import BlockInputs
from lowbit.calibrate.staged import run_block_staged
from lowbit.calibrate.stats import InputStats, exact_math, relative_output_error
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.formats.storage import stored_bits
from lowbit.kernels.online import INPUT, online_child
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.loading import get_module, set_module
from lowbit.quantize.finetune import Start
from lowbit.quantize.methods import ROUNDERS
from lowbit.quantize.recipe import Recipe
from lowbit.quantize.results import LayerResult
from lowbit.quantize.rounding import RoundResult, round_together
from lowbit.quantize.transforms.apply import stage_hook


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
    if in_features % (requested.group_size or 1) == 0:
        return f"group {requested.group_size} -> {applied.group_size}: one group size for every layer of the model"
    if applied.strategy == "channel":
        return f"group {requested.group_size} does not divide in_features {in_features}: per-channel scales"
    return f"group {requested.group_size} does not divide in_features {in_features}: group {applied.group_size}"


def model_scheme(model: nn.Module, table: ArchTable, recipe: Recipe) -> WeightScheme:
    """The recipe's weight scheme with the group size shared by every quantized linear of ``model``."""
    blocks = get_module(model, table.blocks)
    ins = [
        get_module(block, n).in_features
        for i, block in enumerate(blocks)
        for n in table.linears
        if not is_ignored(f"{table.blocks}.{i}.{n}", recipe.ignore)
    ]
    return recipe.weights.for_model(ins)


def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs,
    table: ArchTable,
    recipe: Recipe,
    precision: Precision,
    base: WeightScheme,
    allocated: dict[str, WeightScheme] | None = None,
    timings: dict[str, float] | None = None,
    geometry: Geometry | None = None,
    keep: dict[str, Start] | None = None,
) -> tuple[list[torch.Tensor], list[LayerResult]]:
    """Quantize the linears of one block in place, true-sequentially; return its outputs and per-layer results.

    Args:
        precision: the model dtype and the scale storage dtype, resolved once for the run (Recipe.precision).
        base: the recipe's weight scheme with the model-wide group size (``model_scheme``).
        allocated: full layer name -> the scheme bit allocation chose for it (width, and group size and
            symmetry where the allocation chooses them), overriding the recipe's.
        timings: if given, the seconds spent in the rounding method are added to its "rounding" entry.
        geometry: the model's sizes, needed by a block-level transform (SmoothQuant) of the recipe.
        keep: if given, each layer's float weight and rounding result are stored in it under the full layer
            name (the start of a trained rounding, quantize/finetune.py).
    """
    method = ROUNDERS[recipe.method]
    results: list[LayerResult] = []

    def on_group(index: int, stats: InputStats) -> None:
        with exact_math():  # float32 rounding and errors under --calib-dtype bfloat16's autocast
            round_group(index, stats)

    def round_group(index: int, stats: InputStats) -> None:
        names = [n for n in table.sequential[index] if not is_ignored(f"{prefix}.{n}", recipe.ignore)]
        if not names:
            return
        H = stats.hessian()
        stats.release()  # the float64 sums are read once: their memory is free for the rounding
        schemes: dict[str, tuple[WeightScheme, WeightScheme]] = {}  # name -> (requested, applied)
        for n in names:
            requested, applied = recipe.weights, base
            if allocated is not None:
                requested = applied = allocated[f"{prefix}.{n}"]
            schemes[n] = (requested, applied.for_layer(get_module(block, n).in_features))
        rounded: dict[str, RoundResult] = {}
        for scheme in dict.fromkeys(applied for _, applied in schemes.values()):  # same input, same scheme: one call
            together = [n for n in names if schemes[n][1] == scheme]
            t0 = time.perf_counter()
            Ws = [get_module(block, n).weight.data for n in together]
            res = round_together(method, Ws, H if method.needs_hessian else None, scheme, precision, recipe.rounding)
            rounded.update(zip(together, res))
            if timings is not None:
                timings["rounding"] = timings.get("rounding", 0.0) + time.perf_counter() - t0
        for n in names:
            linear = get_module(block, n)
            W = linear.weight.data
            requested, scheme = schemes[n]
            res = rounded[n]
            bias = linear.bias.data if linear.bias is not None else None
            ql = QuantLinear.from_quantized(res.qweight, recipe.activations, precision.dtype, bias).to(W.device)
            online = online_child(linear, INPUT)
            if online is not None:  # the rotation in front of the float linear stays in front of the quantized one
                ql.set_input_transform(*online)
            W_hat = res.qweight.dequantize(torch.float32)
            results.append(
                LayerResult(
                    name=f"{prefix}.{n}",
                    shape=(ql.out_features, ql.in_features),
                    bits=scheme.bits,
                    strategy=scheme.strategy,
                    group_size=scheme.group_size,
                    fallback=_fallback_note(requested, scheme, ql.in_features),
                    storage_bits=stored_bits(scheme, ql.out_features, ql.in_features, precision.scale_dtype),
                    weight_rel_err=float((W.float() - W_hat).norm() / W.float().norm().clamp_min(1e-30)),
                    output_rel_err=relative_output_error(W, W_hat, H),
                    loss=res.loss,
                    note=res.note,
                    symmetric=scheme.symmetric,
                    scheme=scheme.name,
                )
            )
            set_module(block, n, ql)
            if keep is not None:
                keep[f"{prefix}.{n}"] = Start.on_cpu(W, res)  # the block may be on the GPU

    hook = None if geometry is None else stage_hook(block, table, geometry, recipe.transforms)

    def before(index: int, xs: list[torch.Tensor], kwargs: list[dict[str, object]]) -> bool:
        assert hook is not None
        with exact_math():  # a transform's measurements and folding in float32
            return hook(index, xs, kwargs)

    outputs = run_block_staged(block, table, inputs, on_group, None if hook is None else before)
    for r in results:
        get_module(block, r.name[len(prefix) + 1 :])._w_hat = None  # keep the packed codes, not a float copy
    return outputs, results
