"""Round-to-nearest: every weight to its nearest grid point, scales from the (optionally clipped) range."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.formats.int import compute_qparams, mse_clip, quantize_codes
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.rounding import RoundResult, register_rounder

if TYPE_CHECKING:
    from lowbit.quantize.recipe import RoundingOptions


def rtn_weight(
    W: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float32, options: "RoundingOptions | None" = None
) -> QuantizedWeight:
    """Quantize ``W [out, in]`` (any float dtype) by round-to-nearest, resolving the group fallback first."""
    scheme = scheme.for_layer(W.shape[1])
    clip = 1.0
    if options is not None and options.mse_clip:
        clip = mse_clip(W, scheme, scale_dtype, options.clip_grid, options.max_shrink, options.clip_norm)
    scale, zero = compute_qparams(W, scheme, scale_dtype, clip)
    return QuantizedWeight(quantize_codes(W, scale, zero, scheme), scale, zero, scheme, scale_dtype)


@register_rounder("rtn", needs_hessian=False)
def rtn(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.float32,
    options: "RoundingOptions | None" = None,
) -> RoundResult:
    """The registered RTN method; ``H`` is ignored."""
    return RoundResult(rtn_weight(W, scheme, scale_dtype, options))
