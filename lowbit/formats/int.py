"""Integer grids: scales, zero points, codes and their inverse.

These primitives are shared by every path that quantizes a weight: RTN, GPTQ's column loop, the
fake-quant simulation and the packer all call the same functions, so the simulated and the packed
numbers are the same by construction (DESIGN.md principle 7).

Conventions (those of compressed-tensors, so checkpoints load there as they are):

* codes are signed, ``q in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, stored as int8;
* symmetric: ``s = absmax / qmax``, no zero point, ``w_hat = s * q`` (qmin is never produced by RTN, but a
  code of qmin is legal and dequantizes to ``s * qmin``);
* asymmetric: ``s = (max - min) / (2^b - 1)`` with the range widened to contain 0,
  ``z = clamp(round(qmin - min / s), qmin, qmax)`` (signed, int8), ``w_hat = s * (q - z)``;
* rounding is round-half-to-even (torch.round); the scale is cast to its storage dtype *before* codes
  are computed, and a dequantized value ``s * (q - z)`` is rounded to the model's dtype (as
  compressed-tensors computes it, in that dtype; formats/precision.py), so dequantizing stored tensors
  gives exactly the values that were simulated, in our loader and in transformers + compressed-tensors
  alike.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.formats.parallel import WORKERS, worker_pool
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme

# Smallest scale written: a group of zeros must not give a zero (division by zero) or denormal scale.
SCALE_EPS = 1e-8


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape ``w [out, in]`` to ``[out, in // group_size, group_size]`` (group_size must divide in)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
    return w.reshape(out_features, in_features // group_size, group_size)  # [out, G, g]


def compute_qparams(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.float32,
    clip: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of every group of ``w`` under ``scheme``.

    Args:
        w: float weight ``[out, in]``; any float dtype (computed in float32).
        scheme: the grid; its group size must already be resolved for this layer (``scheme.for_layer``).
        scale_dtype: storage dtype of the scales (formats/precision.py); scales are rounded to it here.
        clip: range shrink factor in (0, 1], a scalar or ``[out, G]`` (used by MSE clipping searches).

    Returns:
        scale: float32 ``[out, G]`` (values representable in ``scale_dtype``); ``G = 1`` for channel,
            and ``[1, 1]`` for tensor.
        zero: int8 ``[out, G]`` signed zero points, or None when symmetric.
    """
    w = w.float()
    if scheme.strategy == "tensor":
        wg = w.reshape(1, 1, -1)
    else:
        wg = group_view(w, scheme.columns_per_scale(w.shape[1]))
    if scheme.symmetric:
        absmax = wg.abs().amax(dim=-1) * clip  # [out, G]
        return _store(absmax / scheme.qmax, scale_dtype), None
    xmin = wg.amin(dim=-1).clamp_max(0.0) * clip  # the range always contains 0
    xmax = wg.amax(dim=-1).clamp_min(0.0) * clip
    levels = (1 << scheme.bits) - 1
    scale = _store((xmax - xmin) / levels, scale_dtype)
    zero = torch.round(scheme.qmin - xmin / scale).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zero


def _store(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round float32 scales to ``scale_dtype`` (never below its smallest normal: no zero or denormal scale)."""
    floor = max(SCALE_EPS, torch.finfo(scale_dtype).tiny)
    return scale.clamp_min(floor).to(scale_dtype).float()


def expand_groups(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[out, G]`` to ``[out, in]`` (each group covers in/G columns)."""
    repeats = in_features // t.shape[1]
    return t.repeat_interleave(repeats, dim=1)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme
) -> torch.Tensor:
    """Signed integer codes of ``w [out, in]`` on the grid (scale ``[out|1, G]``, zero ``[out, G]``); int8 ``[out, in]``."""
    in_features = w.shape[1]
    s = expand_groups(scale, in_features)
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + expand_groups(zero, in_features).float()
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_hat = s * (q - z)`` for int8 codes ``[out, in]``, in ``dtype`` (the model's).

    The product is exact in float32 (small integer times a 16/32-bit float) and is then rounded once to
    ``dtype``, which equals computing it in that dtype.
    """
    in_features = codes.shape[1]
    q = codes.float()
    if zero is not None:
        q = q - expand_groups(zero, in_features).float()
    return (q * expand_groups(scale.float(), in_features)).to(dtype)


def fake_quantize(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Round ``w [out, in]`` to the grid (scales in ``scale_dtype``) and back, in ``w``'s dtype (RTN simulation)."""
    scale, zero = compute_qparams(w, scheme, scale_dtype)
    return dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero, w.dtype)


def fake_quantize_ste(
    w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float32, clip: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """:func:`fake_quantize` for training: the same values (``clip`` as in :func:`compute_qparams`), with the
    rounding straight-through (:func:`round_ste`) and the scale differentiable in ``w`` and ``clip``; float32
    ``[out, in]``. Plain int grids only (``scheme.is_plain_int``)."""
    scale, zero = compute_qparams(w, scheme, scale_dtype, clip)
    s = expand_groups(scale, w.shape[1])
    q = round_ste(w.float() / s)
    if zero is None:
        return q.clamp(scheme.qmin, scheme.qmax) * s
    z = expand_groups(zero, w.shape[1]).float()
    return ((q + z).clamp(scheme.qmin, scheme.qmax) - z) * s


def abs_power_(e: torch.Tensor, norm: float) -> torch.Tensor:
    """``|e|^norm`` in place (float32), the error measure of :func:`mse_clip`.

    Computed as ``exp(norm * log|e|)``: on the CPU torch's ``pow`` with a non-integer exponent is a scalar
    loop, while log and exp are vectorised and several times faster (BENCHMARKS.md, 2026-11-28, code of
    92d95fb). The two agree to ~1e-6 relative; 0 stays 0, inf and NaN stay. ``norm = 2`` is squared exactly.
    """
    e.abs_()
    return e.square_() if norm == 2 else e.log_().mul_(norm).exp_()


def _clip_errors(
    wg: torch.Tensor, stat: tuple[torch.Tensor, torch.Tensor], P: torch.Tensor, scheme: WeightScheme,
    precision: Precision, norm: float,
) -> torch.Tensor:
    """``sum |Q_p(w) - w|^norm`` per group for the shrink factors ``P [C, o|1, G|1]``: float32 ``[C, o, G]``.

    ``wg [o, G, g]`` is the weight in group view and ``stat`` its per-group (min, max) (symmetric: (absmax,
    absmax)); the arithmetic is that of :func:`compute_qparams`, :func:`quantize_codes` and
    :func:`dequantize_codes`, element for element (scales rounded to ``precision.scale_dtype``, the
    dequantized weight to ``precision.dtype``, in place through a half-size copy); the power is
    :func:`abs_power_`. Every op after the division works in place on
    one ``[C, o, G, g]`` buffer.
    """
    scale_dtype = precision.scale_dtype
    if scheme.symmetric:
        scale = _store(stat[1] * P / scheme.qmax, scale_dtype)[..., None]  # [C, o, G, 1]
        w_hat = torch.div(wg, scale).round_().clamp_(scheme.qmin, scheme.qmax).mul_(scale)
    else:
        xmin, xmax = stat[0] * P, stat[1] * P
        scale = _store((xmax - xmin) / ((1 << scheme.bits) - 1), scale_dtype)
        zero = torch.round(scheme.qmin - xmin / scale).clamp(scheme.qmin, scheme.qmax)[..., None]
        scale = scale[..., None]
        w_hat = torch.div(wg, scale).round_().add_(zero).clamp_(scheme.qmin, scheme.qmax).sub_(zero).mul_(scale)
    if precision.dtype != torch.float32:
        w_hat.copy_(w_hat.to(precision.dtype))
    return abs_power_(w_hat.sub_(wg), norm).sum(dim=-1)


# Elements per chunk of candidates evaluated by one call: each temporary ([C, o, G, g] float32) stays just
# under 1 MiB, so it stays in the L2 cache between ops, and under any glibc mmap threshold of 1 MiB or more
# (pipeline.limit_heap_fragmentation) it comes from the heap, not from a fresh mmap whose page faults cost as
# much as the arithmetic (BENCHMARKS.md, 2026-11-28, code of 92d95fb). A weight larger than the chunk
# (GPTQ's on-the-fly groups of more than ~4000 rows, the static and RTN searches over a whole layer) still
# evaluates one candidate per call, in larger temporaries.
CLIP_CHUNK = 255 << 10


def mse_clip(
    w: torch.Tensor,
    scheme: WeightScheme,
    precision: Precision = Precision(),
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    stride: int = 1,
) -> torch.Tensor:
    """Per-group range shrink factor minimising ``sum |Q(w) - w|^norm`` (GPTQ's "MSE" grid search).

    Candidates are ``p_i = 1 - i/grid`` for ``i < max_shrink * grid``; returns float32 ``[out, G]``
    (``[1, 1]`` for a tensor scheme), to pass to :func:`compute_qparams` as ``clip``. The smallest ``i``
    (largest ``p``) wins a tie; each candidate's error is that of the weight as stored and run (``precision``).
    ``stride = 1`` evaluates every candidate (the reference search); ``stride = k > 1`` evaluates every k-th
    candidate, then the k - 1 neighbours on each side of each group's best one, about ``n/k + 2k - 2`` evaluations
    instead of ``n``: the same choice wherever the error, sampled every k candidates, has its minimum in the right
    basin. Chunks of candidates are evaluated on the worker threads (formats/parallel.py; torch releases the GIL
    inside each op) and the choice is made afterwards by candidate index, so the result does not depend on the
    threading.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    w = w.float()
    wg = w.reshape(1, 1, -1) if scheme.strategy == "tensor" else group_view(w, scheme.columns_per_scale(w.shape[1]))  # [o, G, g]
    if scheme.symmetric:
        absmax = wg.abs().amax(dim=-1)
        stat = (absmax, absmax)
    else:
        stat = (wg.amin(dim=-1).clamp_max(0.0), wg.amax(dim=-1).clamp_min(0.0))
    n = max(1, int(max_shrink * grid))

    def evaluate(idx: torch.Tensor) -> torch.Tensor:
        """Errors ``[C, o, G]`` of candidate indices ``idx [C, o|1, G|1]`` (int64)."""
        P = (1.0 - idx.double() / grid).float()  # the float32 value of the Python expression 1 - i/grid
        per = max(1, CLIP_CHUNK // max(wg.numel(), 1))
        parts = list(P.split(per))
        if len(parts) > 1 and WORKERS > 1:
            errs = list(worker_pool("mse").map(lambda p: _clip_errors(wg, stat, p, scheme, precision, norm), parts))
        else:
            errs = [_clip_errors(wg, stat, p, scheme, precision, norm) for p in parts]
        return torch.cat(errs)

    err = evaluate(torch.arange(0, n, stride, device=w.device)[:, None, None])  # [C, o, G]
    idx = torch.arange(0, n, stride, device=w.device)[:, None, None].expand_as(err)
    if stride > 1:
        coarse = _first_min(err, idx)
        offsets = torch.tensor([k for k in range(1 - stride, stride) if k], device=w.device)[:, None, None]
        near = (coarse[None] + offsets).clamp(0, n - 1)  # [2k - 2, o, G]
        idx = torch.cat([idx, near])
        err = torch.cat([err, evaluate(near)])
    return (1.0 - _first_min(err, idx).double() / grid).float()


def _first_min(err: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per group, the smallest candidate index among those of least error: int64 ``[o, G]`` from ``[C, o, G]``."""
    err = err.nan_to_num(nan=float("inf"))  # a non-finite weight: every candidate ties, the first (p = 1) wins
    least = err == err.min(dim=0, keepdim=True).values
    return torch.where(least, idx, torch.iinfo(torch.int64).max).min(dim=0).values


def quantize_activation(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dynamic quantization of activations ``x [..., K]`` along the last dimension, in float32.

    One scale (and zero point) per token (``group_size=None``) or per ``group_size`` consecutive channels of
    each token (``group_size`` must divide ``K``); any leading shape (``[tokens, K]``, ``[b, L, K]``,
    ``[b, heads, L, head_dim]``...).

    compressed-tensors' dynamic activation quantization is followed (``calculate_qparams`` in
    quantization/utils/helpers.py, ``_quantize_dequantize`` / ``_quantize`` / ``_dequantize`` in
    quantization/lifecycle), with ``qmin, qmax = -2^(b-1), 2^(b-1) - 1``:

    * the range always contains 0: ``min = min(min, 0)``, ``max = max(max, 0)`` (then times ``clip_ratio``, which
      compressed-tensors does not have; clipped values clamp to the grid's ends);
    * symmetric: ``s = max(|min|, |max|) / ((2^b - 1) / 2)`` (127.5 for INT8, 7.5 for INT4), no zero point;
    * asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(clamp(qmin - min / s, qmin, qmax))`` (the clamp,
      then the rounding to int8 of ``round_to_quantized_type_dtype``, half to even);
    * codes ``q = round(clamp(x / s + z, qmin, qmax))`` (``round_to_quantized_type_args``: the zero point is
      added *before* rounding, which can differ from ``round(x / s) + z`` on an exact tie);
    * dequantized ``(q - z) * s`` in float32, then cast to the input's dtype.

    Deviations: the scale is clamped to at least ``SCALE_EPS`` (1e-8) before the zero point is computed, where
    compressed-tensors replaces an exact 0 by ``finfo(float32).eps`` after computing it (an all-zero group: its
    zero point is NaN there, ``qmin`` here; both dequantize to 0); the two differ only for groups whose range is
    below ~1e-6. And everything is computed in float32, where compressed-tensors computes in the activation's
    dtype (identical for float32 inputs; for 16-bit inputs it rounds the scale and ``x / s`` to 16 bits first).
    Divisions are elementwise tensor divisions (torch on CUDA multiplies by the reciprocal of a Python-scalar
    divisor, which rounds differently).

    For (8 bits, per token, symmetric, clip 1.0) this is exactly :func:`quantize_activation_per_token`.

    Returns:
        codes: int8 ``[..., K]``; scale: float32 ``[..., G]`` (``G = K / group_size``, 1 per token);
        zero_point: float32 ``[..., G]`` (integer values in ``[qmin, qmax]``) or None when symmetric.
    """
    q, scale, zero = _activation_grid(x, bits, group_size, symmetric, clip_ratio, torch.round)
    return q.to(torch.int8).flatten(-2), scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` (half to even) in the forward pass, the identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _activation_grid(
    x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, clip_ratio: float,
    rnd: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The arithmetic of :func:`quantize_activation` with rounding ``rnd`` for the codes: float32 code values
    ``[..., G, g]``, scale ``[..., G]``, zero point ``[..., G]`` or None. Differentiable where ``rnd`` is (the
    scale follows the range, so a gradient reaches the outliers that set it)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    K = x.shape[-1]
    g = K if group_size is None else group_size
    if g <= 0 or K % g:
        raise ValueError(f"activation group size {group_size} does not divide the last dimension {K}")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    xg = x.float().unflatten(-1, (K // g, g))  # [..., G, g]
    if symmetric:
        absmax = xg.abs().amax(dim=-1)  # [..., G]
        if clip_ratio != 1.0:
            absmax = absmax * clip_ratio
        scale = (absmax / torch.full_like(absmax, ((1 << bits) - 1) / 2)).clamp_min(SCALE_EPS)
        return rnd(xg / scale[..., None]).clamp(qmin, qmax), scale, None
    xmin = xg.amin(dim=-1).clamp_max(0.0)
    xmax = xg.amax(dim=-1).clamp_min(0.0)
    if clip_ratio != 1.0:
        xmin, xmax = xmin * clip_ratio, xmax * clip_ratio
    scale = ((xmax - xmin) / torch.full_like(xmax, (1 << bits) - 1)).clamp_min(SCALE_EPS)
    zero = torch.round((qmin - xmin / scale).clamp(qmin, qmax)).detach()
    return rnd((xg / scale[..., None] + zero[..., None]).clamp(qmin, qmax)), scale, zero


def dequantize_activation(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(q - z) * s`` for the outputs of :func:`quantize_activation` (codes ``[..., K]``, scale and zero point
    ``[..., G]``), computed in float32 and cast to ``dtype``."""
    G = scale.shape[-1]
    q = codes.float().unflatten(-1, (G, codes.shape[-1] // G))
    if zero_point is not None:
        q = q - zero_point.float()[..., None]
    return (q * scale.float()[..., None]).flatten(-2).to(dtype)


def fake_quantize_activation_int(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    ste: bool = False,
) -> torch.Tensor:
    """``x [..., K]`` through :func:`quantize_activation` and back, in ``x``'s dtype (the GEMM's input).

    ``ste``: round with :func:`round_ste`, so that training through it gets gradients (straight-through for the
    rounding, exact for the scale); the values are the same bit for bit.
    """
    if not ste:
        q, s, z = quantize_activation(x, bits, group_size, symmetric, clip_ratio)
        return dequantize_activation(q, s, z, x.dtype)
    qg, s, z = _activation_grid(x, bits, group_size, symmetric, clip_ratio, round_ste)  # [..., G, g]
    if z is not None:
        qg = qg - z[..., None]
    return (qg * s[..., None]).flatten(-2).to(x.dtype)


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization of activations ``x [..., K]``.

    Uses the compressed-tensors convention ``s = absmax / ((2^b - 1) / 2)`` (127.5 for INT8) and clamps to
    ``[-2^(b-1), 2^(b-1) - 1]`` so that a checkpoint run by transformers + compressed-tensors gives the
    same numbers as ours (:func:`quantize_activation` with one group per token, symmetric, no clipping).

    Returns:
        codes: int8 ``[..., K]``; scale: float32 ``[..., 1]``.
    """
    q, scale, _ = quantize_activation(x, bits)
    return q, scale
