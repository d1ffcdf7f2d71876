"""Round-to-nearest: every weight to its nearest grid point, scales from the (optionally clipped) range."""

from __future__ import annotations

import torch

from lowbit.formats.int import compute_qparams, quantize_codes
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.rounding import register_rounder


@register_rounder("rtn", needs_hessian=False)
def rtn(
    W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float32
) -> QuantizedWeight:
    """Quantize ``W [out, in]`` (any float dtype) by round-to-nearest. ``H`` is ignored.

    The group fallback of ``scheme`` is resolved for this layer's in_features first.
    """
    scheme = scheme.for_layer(W.shape[1])
    scale, zero = compute_qparams(W, scheme, scale_dtype)
    return QuantizedWeight(quantize_codes(W, scale, zero, scheme), scale, zero, scheme, scale_dtype)
