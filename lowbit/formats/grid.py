"""Every weight grid behind one interface: parameters, rounding and dequantization for each WeightScheme.

A rounding method (RTN, GPTQ) asks this module for a scheme's parameters, rounds with
:func:`round_values` and dequantizes with :func:`dequantize_values`; it never needs to know which grid it
is on ("the scheme decides the grid, the method decides the rounding"). Both functions work elementwise on
broadcastable tensors, so the whole-matrix path (RTN, the packer, fake-quant) and GPTQ's column loop do the
same arithmetic and give bit-identical numbers.

Grids (``w`` a weight, ``q`` its code's value, ``s`` its group scale, ``z`` its zero point):

=====================  ====================================================  =============================
scheme                 ``w_hat`` (then rounded to the model dtype)            parameters
=====================  ====================================================  =============================
int, float scales      ``(q - z) s``                                          formats/int.py
float, float scales    ``fp(q) s``; ``s = absmax / fmt.max``                  FP8 / FP6 rows or groups
float, e8m0 (MXFP4)    ``fp(q) 2^e``; ``e = floor(log2 amax) - 2``            OCP MX "floor" rule
float, e4m3 (NVFP4)    ``fp(q) (s_b / G)``; ``G = 448 * 6 / amax(W)``,        compressed-tensors' global
                       ``s_b = e4m3(amax_b / 6 * G)``                         scale (a divisor)
int, e4m3 (FireQ)      ``e4m3(q s_g) / p``; ``p = 2^i`` (ALGORITHMS.md §8.1), ``s_g = e4m3(amax_g p / 7)``
int, dual (DGQ)        ``(q - z) (m_g c)``; ``m_g`` integer in [1, 127], per-row ``c`` (ALGORITHMS.md §7.2);
                       codes limited to ``|q - z| <= floor(127 / m_g)`` so ``(q - z) m_g`` is INT8
=====================  ====================================================  =============================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.blockfp import E4M3_TINY, mx_scale
from lowbit.formats.fp import E4M3, decode_fp, encode_fp, fp_format, round_to_fp
from lowbit.formats.int import _store, compute_qparams, expand_groups, group_view
from lowbit.formats.scheme import WeightScheme

FIREQ_MAX_SHIFT = 14  # pre-scales 2^0 .. 2^14 are tried (ALGORITHMS.md §8.1)
DGQ_CANDIDATES = 80  # per-row coarse-scale ratios r = 1.02 - 0.82 i / 80, i = 1..80 (ALGORITHMS.md §7.2)


@dataclass
class GridParams:
    """Parameters of one weight ``[out, in]`` under a scheme.

    Attributes:
        scale: float32 ``[out, G]`` (``[1, 1]`` for a tensor scheme): the group scale; for "e8m0" a power of
            two, for "e4m3" a value of E4M3, for "dual" the integer multiplier ``m_g``.
        zero: int8 ``[out, G]`` signed zero points (asymmetric int grids) or None.
        global_scale: float32 ``[1]``, the per-tensor divisor of "e4m3" scale formats, else None.
        channel_scale: float32 ``[out, 1]``, the coarse per-row scale of "dual", else None.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "GridParams":
        """The parameters of output rows ``start:stop`` (a tensor-wide scale is shared)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t if t.shape[0] == 1 else t[start:stop].clone())
        return GridParams(cut(self.scale), cut(self.zero), self.global_scale, cut(self.channel_scale))


def _view(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``w [out, in]`` as ``[out|1, G, g]`` (the scheme's groups along the last axis)."""
    if scheme.strategy == "tensor":
        return w.reshape(1, 1, -1)
    return group_view(w, scheme.columns_per_scale(w.shape[1]))


def compute_params(
    w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float32, clip: torch.Tensor | float = 1.0
) -> GridParams:
    """Parameters of ``w [out, in]`` (any float dtype) under ``scheme`` (group size resolved for this layer).

    ``clip`` (a scalar or ``[out, G]``) shrinks the range as in formats/int.compute_qparams; the block-scaled
    FP formats ignore it (their scales follow fixed rules).
    """
    if scheme.is_plain_int:
        scale, zero = compute_qparams(w, scheme, scale_dtype, clip)
        return GridParams(scale, zero)
    w = w.float()
    amax = _view(w, scheme).abs().amax(dim=-1)  # [out|1, G]
    if scheme.format == "float":
        fmt = fp_format(scheme.fp or "")
        if scheme.scale_format == "float":
            return GridParams(_store(amax * clip / fmt.max, scale_dtype))
        if scheme.scale_format == "e8m0":
            return GridParams(mx_scale(amax))
        # e4m3 block scales under a per-tensor global divisor (NVFP4)
        G = (E4M3.max * fmt.max / w.abs().amax().clamp_min(1e-12)).reshape(1)
        s_b = round_to_fp(amax / fmt.max * G, E4M3).clamp(E4M3_TINY, E4M3.max)
        return GridParams(s_b, global_scale=G)
    if scheme.scale_format == "e4m3":
        return _fireq_params(w, scheme, amax * clip)
    return _dgq_params(w, scheme, scale_dtype, clip)


def _fireq_params(w: torch.Tensor, scheme: WeightScheme, amax: torch.Tensor) -> GridParams:
    """FireQ: the power-of-two pre-scale ``p`` that removes (or minimises) E4M3 underflow of the group scales
    without any group exceeding 448, then ``s_g = e4m3(amax_g p / qmax)`` floored at 2^-9."""
    w_min = scheme.qmax * E4M3_TINY
    best_i, best_lower = 0, None
    for i in range(FIREQ_MAX_SHIFT + 1):
        a = amax * 2.0**i
        if bool((a > E4M3.max).any()):
            break
        lower = float(((w_min - a).clamp_min(0) / w_min).sum())
        if best_lower is None or lower < best_lower:
            best_i, best_lower = i, lower
    p = 2.0**best_i
    s_g = round_to_fp(amax * p / scheme.qmax, E4M3).clamp(E4M3_TINY, E4M3.max)
    return GridParams(s_g, global_scale=amax.new_tensor([p]))


def _dgq_params(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype, clip: torch.Tensor | float) -> GridParams:
    """DGQ: asymmetric group scales ``s_g``, then per row the coarse scale ``c = r absmax / 127`` (r searched)
    for which ``m_g = clamp(round(s_g / c), 1, 127)`` gives the smallest weight error."""
    plain = WeightScheme("int", scheme.bits, scheme.strategy, scheme.group_size, scheme.symmetric)
    s_g, zero = compute_qparams(w, plain, torch.float32, clip)  # [out, G]
    row_max = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # [out, 1]
    best_err = torch.full_like(row_max, float("inf"))
    best_c = row_max / 127
    for i in range(1, DGQ_CANDIDATES + 1):
        c = (1.02 - 0.82 * i / DGQ_CANDIDATES) * row_max / 127
        m = torch.round(s_g / c).clamp(1, 127)
        params = GridParams(m, zero, channel_scale=c)
        err = (dequantize_values(round_values(w, params, scheme, w.shape[1]), params, scheme, w.shape[1]) - w).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best_err, best_c = torch.where(better, err, best_err), torch.where(better, c, best_c)
    m = torch.round(s_g / best_c).clamp(1, 127)
    return GridParams(m, zero, channel_scale=best_c)


def _expanded(params: GridParams, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scale, zero point and aux (global or channel scale) broadcastable to ``[out, in]``."""
    s = expand_groups(params.scale, in_features)
    z = None if params.zero is None else expand_groups(params.zero, in_features).float()
    aux = params.global_scale if params.global_scale is not None else params.channel_scale
    return s, z, aux


def round_values(w: torch.Tensor, params: GridParams, scheme: WeightScheme, in_features: int | None = None) -> torch.Tensor:
    """The grid value each weight rounds to, float32 of ``w``'s shape: an integer code (``q``, zero point
    included) for int grids, the element value ``fp(q)`` for float grids.

    ``w`` is ``[out, in]`` with ``params`` per group (``in_features`` given), or ``[out]``/``[out, n]`` columns
    with ``params`` already expanded to broadcast against it (``in_features`` None), as GPTQ uses it.
    """
    s, z, aux = _expanded(params, in_features) if in_features is not None else (params.scale, _f(params.zero), _aux(params))
    w = w.float()
    if scheme.format == "float":
        div = s if scheme.scale_format != "e4m3" else s / aux
        return round_to_fp(w / div, fp_format(scheme.fp or ""))
    if scheme.scale_format == "e4m3":  # FireQ: the effective step is s_g / p
        return torch.round(w / (s / aux)).clamp(scheme.qmin, scheme.qmax)
    if scheme.scale_format == "dual":
        q = torch.round(w / (s * aux)) + z
        lim = torch.floor(127 / s)
        return torch.maximum(torch.minimum(q, torch.clamp(z + lim, max=scheme.qmax)), torch.clamp(z - lim, min=scheme.qmin))
    q = torch.round(w / s) if z is None else torch.round(w / s) + z
    return q.clamp(scheme.qmin, scheme.qmax)


def dequantize_values(
    q: torch.Tensor, params: GridParams, scheme: WeightScheme, in_features: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_hat`` of grid values ``q`` (from :func:`round_values`), float32, rounded once to ``dtype`` (the model's,
    formats/precision.py).

    Each product is exact in float32 up to the one rounding the table in the module docstring shows, so the
    packed checkpoint, the fake-quant simulation and GPTQ's column loop agree bit for bit.
    """
    s, z, aux = _expanded(params, in_features) if in_features is not None else (params.scale, _f(params.zero), _aux(params))
    if scheme.format == "float":
        w_hat = q * (s / aux) if scheme.scale_format == "e4m3" else q * s
    elif scheme.scale_format == "e4m3":
        w_hat = round_to_fp(q * s, E4M3) / aux
    elif scheme.scale_format == "dual":
        w_hat = (q - z) * (s * aux)
    else:
        w_hat = q * s if z is None else (q - z) * s
    return w_hat.to(dtype).float()


def _f(z: torch.Tensor | None) -> torch.Tensor | None:
    return None if z is None else z.float()


def _aux(params: GridParams) -> torch.Tensor | None:
    return params.global_scale if params.global_scale is not None else params.channel_scale


def values_to_codes(q: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Stored codes of grid values: int8 integer codes, or uint8 bit patterns of a float element format."""
    if scheme.format == "float":
        return encode_fp(q, fp_format(scheme.fp or ""))
    return q.to(torch.int8)


def codes_to_values(codes: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Inverse of :func:`values_to_codes`: float32 grid values."""
    if scheme.format == "float":
        return decode_fp(codes, fp_format(scheme.fp or ""))
    return codes.float()
