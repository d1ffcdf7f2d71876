"""Weight-only GEMMs on small-float weights: block-scaled FP4 (MXFP4, NVFP4) and row-scaled FP6.

``y [M, N] = x [M, K] @ W_hat^T`` with the weight as stored (docs/KERNELS.md):

* FP4: ``packed`` uint8 ``[N, K/2]`` of E2M1 codes, element ``2j`` in the low nibble of byte ``j``.
  MXFP4 (``block = 32``): ``block_scale`` uint8 E8M0 codes ``[N, K/32]``, ``W_hat = e2m1(c) * 2^(e - 127)``.
  NVFP4 (``block = 16``): ``block_scale`` float8_e4m3fn ``[N, K/16]`` and ``global_scale`` float32 ``[1]``,
  ``W_hat = e2m1(c) * e4m3(s_b) * g``.
* FP6 (FP6-LLM 4+2 split, formats/blockfp.pack_fp6): ``hi2`` uint8 ``[N, K/4]`` (top 2 bits of element
  ``4j + i`` in bits ``2i`` of byte ``j``), ``lo4`` uint8 ``[N, K/2]`` (low 4 bits, as FP4), codes E3M2 or
  E2M3, ``scale`` ``[N, 1]`` float: ``W_hat = fp6(c) * s``.

The Triton kernels stream the weight as stored: each K step loads ``[BLOCK_N, BLOCK_K/2]`` bytes of ``packed``
(or ``[BLOCK_N, BLOCK_K/4]`` of ``hi2`` and ``[BLOCK_N, BLOCK_K/2]`` of ``lo4``), rows contiguous along K, and
interleaves the two nibbles (and the four 2-bit fields) in registers with ``tl.join`` + ``tl.reshape`` into a
``[BLOCK_N, BLOCK_K]`` tile fed to ``tl.dot(x_tile, tl.trans(w_tile))``. A code becomes a float16 by moving
its bits into place (sign to bit 15, exponent and mantissa right below float16's; a minifloat subnormal is a
float16 subnormal) and one exact multiplication by ``2^(15 - bias)``: no lookup table, no fp8 hardware
conversion. Block scales are loaded as ``[BLOCK_N, BLOCK_K/block]`` tiles (one iteration ahead), decoded once
per block and broadcast over a ``[BLOCK_N, BLOCK_K/block, block]`` view. Factors constant along K (NVFP4's
global scale, FP6's row scale) are applied once to the accumulator. The values fed to ``tl.dot``, in the
activation dtype, are exact: FP6 has at most 4 significant bits, ``e2m1 * e4m3`` at most 6 and lies in
[2^-10, 2688] (multiplied in float16); MX products are formed in float32 and rounded once, exact unless the
E8M0 scale leaves float16's range.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.formats.blockfp import MX_BLOCK, NV_BLOCK, dequantize_mxfp4, dequantize_nvfp4, unpack_fp4, unpack_fp6
from lowbit.formats.fp import E2M3, E3M2, decode_fp
from lowbit.kernels.gemm_common import (
    DECODE_BLOCK_K,
    DECODE_BLOCK_N,
    DECODE_PROGRAMS_PER_SM,
    DECODE_STAGES,
    FLOAT_DTYPES,
    SMALL_M,
    GemmConfig,
    _sm_count,
    _split,
    check_activation,
    check_launchable,
    check_tensor,
    even_k,
    launch_gemm,
    triton,
)

if triton is not None:
    import triton.language as tl

    from lowbit.kernels.gemm_common import dot_acc, store_tile

FP6_FORMATS = {"e3m2": E3M2, "e2m3": E2M3}


# ---- torch references ---------------------------------------------------------------------------------

def fp4_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    block: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x [M, K] @ W_hat^T -> [M, N]`` in ``out_dtype`` for an MXFP4 (block 32) or NVFP4 (block 16) weight.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``.
        packed: uint8 ``[N, K/2]`` E2M1 codes, two per byte, the even element in the low nibble.
        block_scale: MX: uint8 E8M0 codes ``[N, K/32]``; NV: float8_e4m3fn ``[N, K/16]``.
        global_scale: NV: float32 ``[1]``; MX: None.
        block: 32 (MXFP4) or 16 (NVFP4).
        out_dtype: float16, bfloat16 or float32.
    """
    _check_fp4(x, packed, block_scale, global_scale, block, out_dtype)
    codes = unpack_fp4(packed)  # uint8 [N, K]
    if block == MX_BLOCK:
        w_hat = dequantize_mxfp4(codes, block_scale)
    else:
        w_hat = dequantize_nvfp4(codes, block_scale.view(torch.uint8), global_scale)
    return F.linear(x.float(), w_hat).to(out_dtype)


def fp6_reference(
    x: torch.Tensor,
    hi2: torch.Tensor,
    lo4: torch.Tensor,
    scale: torch.Tensor,
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x [M, K] @ W_hat^T -> [M, N]`` in ``out_dtype`` for a row-scaled FP6 weight.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``.
        hi2: uint8 ``[N, K/4]`` top 2 bits of each code; lo4: uint8 ``[N, K/2]`` low 4 bits (pack_fp6).
        scale: float ``[N, 1]`` per-output-channel scales.
        fmt: "e3m2" or "e2m3".
        out_dtype: float16, bfloat16 or float32.
    """
    _check_fp6(x, hi2, lo4, scale, fmt, out_dtype)
    w_hat = decode_fp(unpack_fp6(hi2, lo4), FP6_FORMATS[fmt]) * scale.float()  # float32 [N, K]
    return F.linear(x.float(), w_hat).to(out_dtype)


def _check_fp4(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    block: int,
    out_dtype: torch.dtype,
) -> tuple[int, int]:
    """Validate an FP4 GEMM's arguments; return ``(N, K)``."""
    K = check_activation(x, out_dtype)
    if block not in (MX_BLOCK, NV_BLOCK):
        raise LowbitError(f"fp4: block must be {MX_BLOCK} (MXFP4) or {NV_BLOCK} (NVFP4), got {block!r}")
    if K % block:
        raise LowbitError(f"fp4: K = {K} is not a multiple of the {block}-element block")
    if packed.dim() != 2:
        raise LowbitError(f"fp4: packed must be 2-D [N, K/2], got shape {tuple(packed.shape)}")
    N = packed.shape[0]
    check_tensor("packed", packed, (torch.uint8,), (N, K // 2), x.device)
    if block == MX_BLOCK:
        check_tensor("block_scale", block_scale, (torch.uint8,), (N, K // block), x.device)
        if global_scale is not None:
            raise LowbitError("fp4: MXFP4 (block 32) takes no global_scale")
    else:
        check_tensor("block_scale", block_scale, (torch.float8_e4m3fn,), (N, K // block), x.device)
        if global_scale is None:
            raise LowbitError("fp4: NVFP4 (block 16) needs a float32 global_scale [1]")
        check_tensor("global_scale", global_scale, (torch.float32,), (1,), x.device)
    return N, K


def _check_fp6(
    x: torch.Tensor, hi2: torch.Tensor, lo4: torch.Tensor, scale: torch.Tensor, fmt: str, out_dtype: torch.dtype
) -> tuple[int, int]:
    """Validate an FP6 GEMM's arguments; return ``(N, K)``."""
    K = check_activation(x, out_dtype)
    if fmt not in FP6_FORMATS:
        raise LowbitError(f"fp6: unknown format {fmt!r}; valid: {', '.join(FP6_FORMATS)}")
    if K % 4:
        raise LowbitError(f"fp6: K = {K} is not a multiple of 4 (the 4+2 packing)")
    if hi2.dim() != 2:
        raise LowbitError(f"fp6: hi2 must be 2-D [N, K/4], got shape {tuple(hi2.shape)}")
    N = hi2.shape[0]
    check_tensor("hi2", hi2, (torch.uint8,), (N, K // 4), x.device)
    check_tensor("lo4", lo4, (torch.uint8,), (N, K // 2), x.device)
    check_tensor("scale", scale, FLOAT_DTYPES, (N, 1), x.device)
    return N, K


# ---- Triton launchers ----------------------------------------------------------------------------------

def fp4_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    block: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton twin of :func:`fp4_reference` (same arguments, contiguous, one device)."""
    N, K = _check_fp4(x, packed, block_scale, global_scale, block, out_dtype)
    check_launchable(x=x, packed=packed, block_scale=block_scale, global_scale=global_scale)
    nv = block == NV_BLOCK
    # E4M3 scales are decoded from their bit pattern: the same code runs where fp8 loads are unsupported.
    scales = block_scale.view(torch.uint8)
    g = global_scale if nv else scales  # never read for MX
    # Row strides as arguments: Triton specializes integers divisible by 16, so row starts are known to be
    # 16-byte aligned (vector loads, async copies) whenever K allows it.
    weight_args = (packed, scales, g, K // 2, K // block)
    return _launch(_fp4_kernel, x, N, out_dtype, weight_args, SCALE_BLOCK=block, NV=nv)


def fp6_triton(
    x: torch.Tensor,
    hi2: torch.Tensor,
    lo4: torch.Tensor,
    scale: torch.Tensor,
    fmt: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton twin of :func:`fp6_reference` (same arguments, contiguous, one device)."""
    N, K = _check_fp6(x, hi2, lo4, scale, fmt, out_dtype)
    check_launchable(x=x, hi2=hi2, lo4=lo4, scale=scale)
    f = FP6_FORMATS[fmt]
    weight_args = (hi2, lo4, scale, K // 4, K // 2)  # row strides: see fp4_triton
    return _launch(_fp6_kernel, x, N, out_dtype, weight_args, EBITS=f.ebits, MBITS=f.mbits, BIAS=f.bias)


def fp_gemm_config(M: int, N: int, K: int, device: torch.device) -> GemmConfig:
    """Tiles for an H100/H200-class GPU (every tl.dot dim >= 16; BLOCK_K a multiple of the 32-element MX block).

    ``M <= 16`` (decode) is memory bound: as W4A16 (w4a16.gemm_config), small ``16 x 64 x 128`` tiles on 4 warps
    and DECODE_STAGES (3) stages, so several programs share an SM, and K is split until about ``DECODE_PROGRAMS_PER_SM`` programs
    per SM run, enough loads in flight to cover HBM latency. Larger ``M``: 32/64 x 128 x 64 tiles (4 warps) up to
    64 rows, then 128 x 128 x 64 with 8 warps, no split. The pipeline stages hold the activation tile and the
    packed weight bytes (the scales are prefetched into registers).

    Under the interpreter every tile op costs Python overhead: 128-wide N and K tiles on a pretend 4-SM
    device, so few programs run, split-K still splits, and the tests reach partial and fully masked K tiles.
    """
    if device.type != "cuda":
        if M <= SMALL_M:
            return GemmConfig(16, 128, 128, _split(N, K, 128, 128, 4), 4, 3)  # 4 programs
        return GemmConfig(32 if M <= 32 else 64, 128, 128, 1, 4, 3)
    if M <= SMALL_M:
        block_n, block_k = DECODE_BLOCK_N, DECODE_BLOCK_K
        split = _split(N, K, block_n, block_k, DECODE_PROGRAMS_PER_SM * _sm_count(device))
        return GemmConfig(16, block_n, block_k, split, 4, DECODE_STAGES)
    if M <= 64:
        return GemmConfig(32 if M <= 32 else 64, 128, 64, 1, 4, 3)
    return GemmConfig(128, 128, 64, 1, 8, 3)


def _launch(
    kernel: Any, x: torch.Tensor, N: int, out_dtype: torch.dtype, weight_args: tuple[Any, ...], **constexprs: Any
) -> torch.Tensor:
    """:func:`gemm_common.launch_gemm` on :func:`fp_gemm_config` tiles; ``EVEN_K`` drops the K masks where every
    split walks only full K tiles (rows past M or N are clamped, never masked)."""
    cfg = fp_gemm_config(x.shape[0], N, x.shape[1], x.device)
    return launch_gemm(kernel, x, N, out_dtype, weight_args, cfg=cfg, EVEN_K=even_k(x.shape[1], cfg), **constexprs)


# ---- Triton kernels ------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def decode_minifloat(code, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
        """float32 value of int32 ``code`` holding a ``[sign | EBITS | MBITS]`` bit pattern (no inf/NaN codes).

        ``|v| = (E > 0 ? 2^MBITS + M : M) * 2^(max(E, 1) - BIAS - MBITS)``: an integer significand times a
        power of two made from float32 exponent bits, both exact. Used for the block scales (once per block).
        """
        E = (code >> MBITS) & ((1 << EBITS) - 1)
        M = code & ((1 << MBITS) - 1)
        significand = tl.where(E > 0, M + (1 << MBITS), M).to(tl.float32)
        pow2 = ((tl.maximum(E, 1) + (127 - BIAS - MBITS)) << 23).to(tl.float32, bitcast=True)
        v = significand * pow2
        return tl.where(((code >> (EBITS + MBITS)) & 1) != 0, -v, v)

    @triton.jit
    def decode_e8m0(code):
        """float32 ``2^(code - 127)`` of int32 E8M0 codes (0 gives the subnormal 2^-127; 255, NaN, is never written)."""
        bits = tl.where(code == 0, 0x00400000, code << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def fp16_bits_to_value(bits, UNBIAS: tl.constexpr):
        """float16 ``bits`` (int32 holding a 16-bit pattern) times ``2^UNBIAS``: exact for the small floats here.

        A ``[sign | e | m]`` minifloat code with ``EBITS <= 5`` and ``MBITS <= 10`` placed as
        ``sign << 15 | (e, m) << (10 - MBITS)`` is a float16 whose value is the minifloat's times
        ``2^(BIAS - 15)``, for normals (exponent ``E - 15`` vs ``E - BIAS``) and subnormals (``E = 0`` is a float16
        subnormal) alike; ``UNBIAS = 15 - BIAS`` restores it. The product is zero or a normal float16 (nonzero
        E2M1, E3M2, E2M3 magnitudes lie in [2^-4, 28]), computed exactly in float16.
        """
        return bits.to(tl.uint16).to(tl.float16, bitcast=True) * (1 << UNBIAS)

    @triton.jit
    def load_x_tile(x_rows, m_mask, offs_k, K, EVEN_K: tl.constexpr):
        """``[BLOCK_M, BLOCK_K]`` activation tile. Rows past M are masked, not clamped: a decode batch (M = 1 of
        BLOCK_M = 16) then reads its one row, not 16 copies of it."""
        if EVEN_K:
            mask = m_mask[:, None]
        else:
            mask = m_mask[:, None] & (offs_k < K)[None, :]
        return tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)

    @triton.jit
    def load_k_tile(row_ptrs, offs, limit, EVEN_K: tl.constexpr):
        """``[R, C]`` tile at ``row_ptrs [R, 1] + offs [C]`` (C contiguous along K); zeros at ``offs >= limit``."""
        if EVEN_K:
            tile = tl.load(row_ptrs + offs[None, :])
        else:
            tile = tl.load(row_ptrs + offs[None, :], mask=(offs < limit)[None, :], other=0)
        return tile

    @triton.jit
    def _fp4_kernel(
        x_ptr, y_ptr, M, N, K,
        w_ptr, s_ptr, g_ptr, stride_w, stride_s,
        SCALE_BLOCK: tl.constexpr, NV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K
        # Weight rows past N (a ragged last N tile) re-read valid rows, never stored: no row mask on the weight.
        rows = (offs_n % N)[:, None].to(tl.int64)  # weight tiles are [BLOCK_N, BLOCK_K], contiguous along K
        w_rows = w_ptr + rows * stride_w  # K / 2
        s_rows = s_ptr + rows * stride_s  # K / SCALE_BLOCK
        # The block scales, [BLOCK_N, BLOCK_K / SCALE_BLOCK] per K tile, are loaded one iteration ahead: too few
        # bytes per thread for the pipeliner's async copies in most configurations, they would otherwise
        # stall every iteration. The first tile of a split always starts below K (no empty splits).
        offs_g = tl.arange(0, BLOCK_K // SCALE_BLOCK)
        sc_next = load_k_tile(s_rows, pid_k * K_ITERS * (BLOCK_K // SCALE_BLOCK) + offs_g, stride_s, EVEN_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(K_ITERS):  # constexpr trip count (see _launch); the last split may run past K, masked
            t = pid_k * K_ITERS + i
            a = load_x_tile(x_rows, m_mask, t * BLOCK_K + tl.arange(0, BLOCK_K), K, EVEN_K)
            b = load_k_tile(w_rows, t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2), stride_w, EVEN_K).to(tl.int32)
            sc = sc_next.to(tl.int32)  # one scale per block, decoded once
            sc_next = load_k_tile(s_rows, (t + 1) * (BLOCK_K // SCALE_BLOCK) + offs_g, stride_s, False)
            # E2M1 [s | e1 e0 | m] -> float16 bits s << 15 | (e1 e0 m) << 9, for the low (even element) and the
            # high nibble of each byte; joined as [BLOCK_N, BLOCK_K/2, 2] the last axis is the element parity.
            lo = ((b & 0x7) << 9) | ((b & 0x8) << 12)
            hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
            v = fp16_bits_to_value(tl.join(lo, hi), 14)  # exact E2M1 values, float16
            v = tl.reshape(v, (BLOCK_N, BLOCK_K // SCALE_BLOCK, SCALE_BLOCK))  # element k = block * SCALE_BLOCK + j
            if NV:
                # e2m1 (a multiple of 1/2) * e4m3 (of 2^-9): <= 6 significant bits in [2^-10, 2688], exact in float16.
                s = decode_minifloat(sc, 4, 3, 7).to(tl.float16)  # E4M3 (0x7F, NaN, is never written)
                w = (v * s[:, :, None]).to(a.dtype)
            else:
                # E8M0 scales may lie outside float16's range: multiply in float32, round once.
                w = (v.to(tl.float32) * decode_e8m0(sc)[:, :, None]).to(a.dtype)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            acc = dot_acc(a, tl.trans(w), acc, DOT_IEEE)
        if NV:
            acc = acc * tl.load(g_ptr)
        store_tile(acc, y_ptr, offs_m, offs_n, M, N, SPLIT_K)

    @triton.jit
    def _fp6_kernel(
        x_ptr, y_ptr, M, N, K,
        hi_ptr, lo_ptr, s_ptr, stride_hi, stride_lo,
        EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K
        # Weight rows past N (a ragged last N tile) re-read valid rows, never stored: no row mask on the weight.
        rows = (offs_n % N)[:, None].to(tl.int64)  # weight tiles are [BLOCK_N, BLOCK_K], contiguous along K
        hi_rows = hi_ptr + rows * stride_hi  # K / 4
        lo_rows = lo_ptr + rows * stride_lo  # K / 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(K_ITERS):  # constexpr trip count (see _launch); the last split may run past K, masked
            t = pid_k * K_ITERS + i
            a = load_x_tile(x_rows, m_mask, t * BLOCK_K + tl.arange(0, BLOCK_K), K, EVEN_K)
            h = load_k_tile(hi_rows, t * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4), stride_hi, EVEN_K).to(tl.int32)
            lo = load_k_tile(lo_rows, t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2), stride_lo, EVEN_K).to(tl.int32)
            # hi2 byte j holds the top 2 bits of elements 4j + p in bits 2p: join to [.., j, q, r] with
            # element 4j + 2q + r, i.e. join(join(p=0, p=2), join(p=1, p=3)), then view as [BLOCK_N, BLOCK_K/2, 2]
            # to line up with the lo4 plane's (byte, nibble) pairs.
            top = tl.join(tl.join(h & 0x3, (h >> 4) & 0x3), tl.join((h >> 2) & 0x3, (h >> 6) & 0x3))
            top = tl.reshape(top, (BLOCK_N, BLOCK_K // 2, 2))
            code = (top << 4) | tl.join(lo & 0xF, lo >> 4)  # [sign | EBITS | MBITS], [BLOCK_N, BLOCK_K/2, 2]
            bits = ((code & 0x20) << 10) | ((code & 0x1F) << (10 - MBITS))  # as a float16 (fp16_bits_to_value)
            w = fp16_bits_to_value(bits, 15 - BIAS).to(a.dtype)  # exact FP6 values
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            acc = dot_acc(a, tl.trans(w), acc, DOT_IEEE)
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # the row scale, once
        store_tile(acc * s[None, :], y_ptr, offs_m, offs_n, M, N, SPLIT_K)
