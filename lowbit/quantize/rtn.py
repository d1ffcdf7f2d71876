"""Round-to-nearest: every weight to its nearest grid point, scales from the (optionally clipped) range."""

from __future__ import annotations

import torch

from lowbit.formats.grid import GridParams, compute_params, round_values, values_to_codes
from lowbit.formats.int import expand_groups, mse_clip
from lowbit.formats.precision import Precision
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.rounding import RoundResult, register_rounder, start_positions


def rtn_weight(
    W: torch.Tensor, scheme: WeightScheme, precision: Precision = Precision(), options: RoundingOptions | None = None
) -> QuantizedWeight:
    """Quantize ``W [out, in]`` (any float dtype) by round-to-nearest, resolving the group fallback first.

    The MSE clipping search applies to plain int grids; the other grids take their scales as formats/grid.py
    defines them.
    """
    scheme = scheme.for_layer(W.shape[1])
    clip = 1.0
    if options is not None and options.mse_clip and scheme.is_plain_int:
        clip = mse_clip(W, scheme, precision, options.clip_grid, options.max_shrink, options.clip_norm, options.clip_stride)
    params = compute_params(W, scheme, precision.scale_dtype, clip)
    return from_values(round_values(W, params, scheme, W.shape[1]), params, scheme, precision)


def from_values(q: torch.Tensor, params: GridParams, scheme: WeightScheme, precision: Precision) -> QuantizedWeight:
    """A QuantizedWeight from grid values ``q [out, in]`` (formats/grid.round_values) and their parameters."""
    return QuantizedWeight(values_to_codes(q, scheme), params.scale, params.zero, scheme, precision,
                           params.global_scale, params.channel_scale)


@register_rounder("rtn", needs_hessian=False)
def rtn(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scheme: WeightScheme,
    precision: Precision = Precision(),
    options: RoundingOptions | None = None,
    positions: bool = False,
) -> RoundResult:
    """The registered RTN method; ``H`` is ignored. With ``positions`` (plain int grids) the result also holds
    ``W / s + z``, where each weight lies on the grid (the start of DiscQuant)."""
    qw = rtn_weight(W, scheme, precision, options)
    return RoundResult(qw, positions=grid_positions(W, qw) if positions and qw.scheme.is_plain_int else None)


def grid_positions(W: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Where each weight of ``W [out, in]`` lies on ``qw``'s plain int grid, in code units (``W / s + z``, float32
    ``[out, in]``), kept within half a step of its code (rounding.start_positions)."""
    raw = W.float() / expand_groups(qw.scale, W.shape[1])
    if qw.zero is not None:
        raw = raw + expand_groups(qw.zero, W.shape[1]).float()
    return start_positions(qw.codes.float(), raw)
