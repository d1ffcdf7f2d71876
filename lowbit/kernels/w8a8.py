"""W8A8 kernels: per-token activation quantization (INT8, FP8 E4M3) and the scaled INT8/FP8 GEMM.

Functions (docs/KERNELS.md):

* ``quantize_per_token_int8_{reference,triton}(x)``: ``s = max(absmax/127.5, 1e-8)``,
  ``q = clamp(round_half_even(x/s), -128, 127)`` (compressed-tensors; ``formats.int.quantize_activation_per_token``).
* ``quantize_per_token_fp8_{reference,triton}(x)``: ``s = max(absmax/448, 1e-12)``, ``q = e4m3(x/s)``, RNE, saturating.
* ``scaled_mm_{reference,triton}(xq, xs, w, ws, out_dtype)``: ``y = (xq @ w^T) * xs * ws^T``; INT8 accumulates
  exactly in int32, FP8 in float32.

The module also holds the pieces the other activation-quantized kernels (a8w4.py, int4_fp8.py) share: the
round-half-even and E4M3 rounding ``@triton.jit`` helpers, the launch checks and the tile choices.

Rounding is done arithmetically in float32, the same source compiled and interpreted:

* ``libdevice.rint`` does not run under the Triton interpreter, so round-half-even is ``floor`` plus a tie test;
* the interpreter's float32 -> float8e4nv cast mis-rounds values whose rounding carries into the next binade
  (31.6 -> 16 instead of 32), so values are first rounded onto the E4M3 grid in float32 (:func:`round_e4m3`,
  the same algorithm as ``formats.fp.round_to_fp``) and only then cast; casting an exactly representable value
  is exact in the interpreter and on the GPU (where ``cvt.rn.satfinite`` would round identically anyway);
* K (the loop bound) is a ``tl.constexpr``: the interpreter stores runtime scalars as 1-element arrays, which
  NumPy >= 2.4 refuses to convert to a Python int in ``range``; compiled, it costs one specialization per layer
  width (a model has two or three) and gives the K loop a constant trip count;
* divisions use ``tl.div_rn``: the default float32 ``/`` compiles to an approximate division on NVIDIA GPUs, and
  the codes must equal torch's IEEE division bit for bit.

The FP8 tensors themselves load, store and feed ``tl.dot`` as float8e4nv in both modes (the interpreter computes
the FP8 dot on the decoded values; Hopper runs an FP8 tensor-core dot with float32 accumulation).

FP8_DOT_NOTE: Hopper's FP8 MMA adds products inside the tensor core with only ~14 significant bits, and Triton's
sm_90 default lets a whole K loop accumulate that way. The FP8 dots pass ``max_num_imprecise_acc=BLOCK_K`` so the
tile's partial sum is added into the float32 accumulator with a true float32 add once per K tile (DeepSeek-V3's
promotion interval of 128): the low-precision part of the sum never spans more than BLOCK_K products, however
long K is. The interpreter ignores the argument.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.formats.fp import FP8_SCALE_EPS, quantize_activation_per_token_fp8
from lowbit.formats.int import SCALE_EPS as INT8_SCALE_EPS, quantize_activation_per_token
from lowbit.kernels.gemm_common import _sm_count, check_tensor, group_block_k, group_mode

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# |int8 * int8| <= 2^14, so K < 2^17 products always fit the int32 accumulator.
MAX_K_INT32 = 1 << 17


# ---------------------------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def round_half_even(t):
    """Round float32 ``t`` to the nearest integer, ties to even (``torch.round``); |t| < 2^22."""
    f = tl.floor(t)
    d = t - f  # in [0, 1); exact except where the rounding of t + 1 cannot change the answer
    odd = (f - 2.0 * tl.floor(0.5 * f)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up.to(tl.float32)


@triton.jit
def round_e4m3(v):
    """Round float32 ``v`` (finite) to the nearest E4M3 value, ties to even, saturating at +-448; keeps the sign of 0.

    The result is float32 and exactly representable in E4M3, so a following ``.to(tl.float8e4nv)`` is exact.
    """
    bits = v.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(v), 448.0)
    # floor(log2 a) from the float32 exponent field; subnormals (and 0) share the smallest normal's step 2^-9.
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv_step = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)  # 2^(3-e); both products are exact
    r = round_half_even(a * inv_step) * step
    sign = (bits >> 31) << 31  # 0x80000000 for negative inputs (also -0.0), else 0
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------------------------------------
# Shared launcher helpers
# ---------------------------------------------------------------------------------------------------------------


def check_launch(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> None:
    """Raise LowbitError unless ``x`` is a 2-D tensor Triton can run on and ``out_dtype`` a model dtype.

    CPU tensors need the Triton interpreter (``TRITON_INTERPRET=1``); without it a launch would fail deep inside
    Triton with an unreadable message.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise LowbitError(f"kernel input must be a 2-D tensor, got shape {list(getattr(x, 'shape', []))}")
    interpreting = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if x.device.type == "cpu" and not interpreting:
        raise LowbitError("Triton kernels on CPU tensors need TRITON_INTERPRET=1; use the torch backend")
    if x.device.type not in ("cpu", "cuda"):
        raise LowbitError(f"Triton kernels run on CUDA tensors (or CPU ones when interpreted), not {x.device.type}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise LowbitError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")


def check_group(group_size: int, k: int) -> None:
    """Raise LowbitError unless ``group_size`` is a positive divisor of ``k``."""
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise LowbitError(f"group size {group_size} must be a positive divisor of K={k}")


def gemm_config(m: int) -> dict[str, int]:
    """Tile sizes for an 8-bit-operand GEMM with ``m`` rows (H100/H200 tensor cores).

    Decode (m <= 16) uses the smallest M tile ``tl.dot`` accepts and narrow N tiles so more programs cover the
    weight; larger m uses 64- or 128-wide tiles. BLOCK_K is a multiple of 32, as 8-bit MMAs need.
    """
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}


def int4_gemm_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict[str, int]:
    """Tiles for the INT4-weight GEMMs with 8-bit activations (a8w4, int4_fp8), as ``kernel[grid](**cfg)`` kwargs.

    On the GPU (H100/H200): decode (m <= 16) is memory bound and, with no split-K (exact int32 accumulation),
    gets its programs in flight from narrow weight tiles: 16-row tiles with 256-wide K tiles and 32-row weight
    tiles (16 when N/32 is under half the SM count) on 4 warps, 4 stages; m <= 64 runs ``64 x 128 x 128`` and larger m ``128 x 128 x 128``, both on 8
    warps, 3 stages. Shared memory per stage is ``BLOCK_M*BLOCK_K + BLOCK_N*BLOCK_K/2`` bytes (at most 24 KiB)
    plus one int8/fp8 dequantized tile. Interpreted (CPU tensors) the tiles are those the tests were sized for.
    BLOCK_K then follows ``gemm_common.group_block_k`` (8-bit dots need K tiles of at least 32), and the returned
    dict also carries the kernel constexprs ``GROUP_MODE`` and ``EVEN_K`` (K a multiple of BLOCK_K).
    """
    if device.type != "cuda":
        if m <= 16:
            bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
        elif m <= 64:
            bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    elif m <= 16:
        # No split-K (the int32 accumulator must stay exact): narrow weight tiles give the programs in flight.
        bm, bk, warps, stages = 16, 256, 4, 4
        bn = 32 if triton.cdiv(n, 32) >= _sm_count(device) // 2 else 16  # measured: 16 only pays for small N
    else:
        bm, bn, bk, warps, stages = 64 if m <= 64 else 128, 128, 128, 8, 3
    bk = group_block_k(group_size, bk, 32)
    return {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_MODE": group_mode(group_size, bk), "EVEN_K": k % bk == 0,
        "num_warps": warps, "num_stages": stages,
    }


def gemm_grid(m: int, n: int, cfg: dict[str, int]) -> tuple[int, int]:
    """Program grid ``(M tiles, N tiles)`` for :func:`gemm_config` tiles."""
    return triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"])


def scale_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``acc [M, N]`` (float64, exact) -> ``(acc * xs) * ws^T`` in float32 -> ``out_dtype``; the kernels' order."""
    return (acc.float() * xs.float() * ws.float().reshape(1, -1)).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Per-token activation quantization
# ---------------------------------------------------------------------------------------------------------------


def quantize_per_token_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 of ``x [M, K]`` (any float dtype): int8 ``[M, K]`` codes, float32 ``[M, 1]`` scales."""
    return quantize_activation_per_token(x, bits=8)


def quantize_per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 E4M3 of ``x [M, K]``: float8_e4m3fn ``[M, K]`` values, float32 ``[M, 1]`` scales."""
    return quantize_activation_per_token_fp8(x)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K: tl.constexpr, BLOCK: tl.constexpr, IS_FP8: tl.constexpr):
    """One program per row: pass 1 finds the row's absmax, pass 2 writes the codes."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * K
    q_row = q_ptr + row * K
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    absmax = tl.max(amax, axis=0)
    if IS_FP8:
        s = tl.maximum(tl.div_rn(absmax, 448.0), 1e-12)
    else:
        s = tl.maximum(tl.div_rn(absmax, 127.5), 1e-8)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        t = tl.div_rn(x, s)
        if IS_FP8:
            q = round_e4m3(t).to(tl.float8e4nv)
        else:
            q = tl.minimum(tl.maximum(round_half_even(t), -128.0), 127.0).to(tl.int8)
        tl.store(q_row + offs, q, mask=offs < K)


def _quantize_per_token_triton(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    check_launch(x)
    if x.dtype not in OUT_DTYPES:
        raise LowbitError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not x.is_contiguous():
        raise LowbitError("activations must be contiguous")
    m, k = x.shape
    q = torch.empty(m, k, dtype=code_dtype, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s.fill_(INT8_SCALE_EPS if code_dtype == torch.int8 else FP8_SCALE_EPS)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_per_token_kernel[(m,)](x, q, s, k, BLOCK=block, IS_FP8=code_dtype == FP8, num_warps=4)
    return q, s


def quantize_per_token_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quantize_per_token_int8_reference`; bit-identical codes and scales.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``, contiguous.

    Returns:
        codes int8 ``[M, K]`` and scales float32 ``[M, 1]``.
    """
    return _quantize_per_token_triton(x, torch.int8)


def quantize_per_token_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quantize_per_token_fp8_reference`; bit-identical codes and scales.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``, contiguous.

    Returns:
        values float8_e4m3fn ``[M, K]`` and scales float32 ``[M, 1]``.
    """
    return _quantize_per_token_triton(x, FP8)


# ---------------------------------------------------------------------------------------------------------------
# Scaled INT8 / FP8 GEMM
# ---------------------------------------------------------------------------------------------------------------


def scaled_mm_reference(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``y [M, N] = (xq @ w^T) * xs * ws^T`` in ``out_dtype``.

    Args:
        xq: int8 or float8_e4m3fn ``[M, K]`` (the dtype of ``w``).
        xs: float32 ``[M, 1]`` per-token scales.
        w: int8 or float8_e4m3fn ``[N, K]``, row-major (output channel rows).
        ws: float32 ``[N, 1]`` per-channel scales.

    The product is computed in float64, where it is exact for INT8 (|sum| <= K 2^14) and FP8 products alike,
    then rounded once to float32 as the kernels' accumulators are.
    """
    acc = xq.double() @ w.double().t()  # [M, N]
    return scale_epilogue(acc, xs, ws, out_dtype)


@triton.jit
def _scaled_mm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_INT8: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; ``x [M, K]`` and ``w [N, K]`` row-major, ``y [M, N]``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K  # [BM, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K  # [1, BN]: w^T tile addresses
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_rows + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
        b = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # [BK, BN]
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)  # see FP8_DOT_NOTE
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def scaled_mm_triton(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Triton twin of :func:`scaled_mm_reference` (same arguments); returns ``out_dtype [M, N]``."""
    check_launch(xq, out_dtype)
    if xq.dtype not in (torch.int8, FP8):
        raise LowbitError(f"xq must be int8 or float8_e4m3fn, got {xq.dtype}")
    m, k = xq.shape
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise LowbitError("w must be a 2-D [N, K] tensor")
    n = w.shape[0]
    dev = xq.device
    check_tensor("xq", xq, xq.dtype, (m, k), dev)
    check_tensor("xs", xs, torch.float32, (m, 1), dev)
    check_tensor("w", w, xq.dtype, (n, k), dev)
    check_tensor("ws", ws, torch.float32, (n, 1), dev)
    if xq.dtype == torch.int8 and k >= MAX_K_INT32:
        raise LowbitError(f"K={k} is too large for an exact int32 accumulator (limit {MAX_K_INT32 - 1})")
    y = torch.empty(m, n, dtype=out_dtype, device=dev)
    if m == 0 or n == 0:
        return y
    cfg = gemm_config(m)
    _scaled_mm_kernel[gemm_grid(m, n, cfg)](xq, xs, w, ws, y, m, n, k, IS_INT8=xq.dtype == torch.int8, **cfg)
    return y
