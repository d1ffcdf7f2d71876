"""SmoothQuant (ALGORITHMS.md 9.3): migrate activation outliers into the weights with per-channel scales.

For a norm and the linears that read it, ``s_j = max|X_j|^alpha / max_readers |W[:, j]|^(1 - alpha)``: the norm
gain is divided by ``s`` and the readers' columns multiplied by it, which leaves every product unchanged and
flattens the activation channels. The two inner inputs get the same migration from the linear that produces
them: v_proj's output rows are divided by ``s`` and o_proj's input columns multiplied, with one scale per
(KV head, channel), the largest over the query heads that share it (attention mixes tokens but never
channels); up_proj's rows are divided and down_proj's columns multiplied (the MLP is linear in up's output),
which is where SmolLM2's largest activation outliers are. The statistics are those of
the block's own calibration inputs, measured by the staged runner's hook (calibrate/staged.py) after the earlier
blocks are quantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.distributed import all_reduce
from lowbit.calibrate.staged import StageHook, input_of_linear
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.loading import get_module
from lowbit.quantize.transforms.base import BLOCK, register

EPS = 1e-5  # the reference's clamp on the scales


def _absmax(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-channel ``max |x|`` over every token of every batch: ``[D]`` float64."""
    local = torch.stack([x.detach().abs().reshape(-1, x.shape[-1]).amax(0) for x in xs]).amax(0).double()
    return all_reduce(local, "max")  # over every process's batches in a distributed run (lowbit/distributed.py)


def migration_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_max^alpha / w_max^(1 - alpha)`` clamped to >= 1e-5; 1 where a channel saw no activation or no
    weight (float64 ``[D]``)."""
    s = (x_max.pow(alpha) / w_max.clamp_min(EPS).pow(1 - alpha)).clamp_min(EPS)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def _divide_rows(linear: nn.Module, s: torch.Tensor) -> None:
    """Output channel ``j`` of ``linear`` (weight row and bias) divided by ``s_j``, rounded once from float64."""
    with torch.no_grad():
        linear.weight.data.copy_((linear.weight.data.double() / s[:, None]).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.data.copy_((linear.bias.data.double() / s).to(linear.bias.dtype))


def _scale_columns(linear: nn.Module, s: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.data.copy_((linear.weight.data.double() * s).to(linear.weight.dtype))


@register("smoothquant", BLOCK, options=("alpha",),
          description="SmoothQuant: per-channel scales migrated from the activations into the norm gains, v into o, up into down")
def smoothquant(block: nn.Module, table: ArchTable, geometry: Geometry, alpha: float) -> StageHook:
    """The stage hook that smooths ``block``'s two norms, v into o with the first, up into down with the second (the
    producing linear must still be in float: it is quantized right after the hook)."""

    def before(index: int, xs: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> bool:
        norm_name, reader_names = table.norms[0 if index == 0 else 1]
        readers = [get_module(block, r) for r in reader_names]
        w_max = torch.stack([r.weight.detach().abs().amax(0) for r in readers]).amax(0).double()
        s = migration_scales(_absmax(xs), w_max, alpha)
        gain = getattr(get_module(block, norm_name), table.norm_gain)
        with torch.no_grad():
            gain.data.copy_((gain.data.double() / s).to(gain.dtype))
        for r in readers:
            _scale_columns(r, s)
        smoothed = [x / s.to(x.dtype) for x in xs]  # what the norm now computes, up to rounding
        if index == 0:
            _smooth_value_out(block, table, geometry, smoothed, kwargs, alpha)
        else:
            _smooth_up_down(block, table, smoothed, alpha)
        return True

    return before


def _smooth_up_down(block: nn.Module, table: ArchTable, xs: list[torch.Tensor], alpha: float) -> None:
    """up -> down migration, measured on down_proj's inputs for the (already smoothed) norm outputs ``xs``:
    ``down(act(gate(x)) * up(x))`` is linear in up's outputs, so up's rows are divided by ``s`` and down's columns
    multiplied."""
    mlp = get_module(block, table.mlp)
    down_in = _absmax([input_of_linear(block, mlp, table.down, x, {}) for x in xs])
    down, up = get_module(block, table.down), get_module(block, table.up)
    s = migration_scales(down_in, down.weight.detach().abs().amax(0).double(), alpha)
    _divide_rows(up, s)
    _scale_columns(down, s)


def _smooth_value_out(
    block: nn.Module, table: ArchTable, geometry: Geometry, xs: list[torch.Tensor], kwargs: list[dict[str, Any]],
    alpha: float,
) -> None:
    """v -> o migration, measured on o_proj's inputs for the (already smoothed) norm outputs ``xs``."""
    attn = get_module(block, table.attention)
    o_in = _absmax([input_of_linear(block, attn, table.out, x, kw) for x, kw in zip(xs, kwargs)])
    g, d = geometry.heads // geometry.kv_heads, geometry.head_dim
    o = get_module(block, table.out)
    w_max = o.weight.detach().abs().amax(0).double()
    # o_proj's input channel (query head h, j) carries value channel (KV head h // g, j): one scale per value channel
    per_kv = lambda t: t.reshape(geometry.kv_heads, g, d).amax(1).reshape(-1)  # noqa: E731
    s = migration_scales(per_kv(o_in), per_kv(w_max), alpha)
    _divide_rows(get_module(block, table.value), s)
    _scale_columns(o, s.reshape(geometry.kv_heads, 1, d).expand(-1, g, -1).reshape(-1))
