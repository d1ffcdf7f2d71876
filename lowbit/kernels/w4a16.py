"""W4A16: ``y = x @ W_hat^T`` with INT4 group-quantized weights, dequantized inside the GEMM main loop.

Weights are the tensors a pack-quantized QuantLinear holds (docs/KERNELS.md, docs/FORMAT.md):

* ``packed`` int32 ``[N, K/8]``: element ``k`` of a row in bits ``4*(k%8)`` of word ``k//8``, stored as ``q + 8``;
* ``scale`` float16/bfloat16/float32 ``[N, K/g]``;
* ``zero`` int8 ``[N, K/g]`` signed zero points, or None (symmetric);

and ``W_hat = (q - z) * s``, rounded to the scale's dtype (formats/int.dequantize_codes). ``g`` is a multiple
of 8, so a word never straddles two groups; channel-wise scales are ``g == K``.

The kernel never materializes ``W_hat``. Per K tile it loads the packed words as an ``[BLOCK_N, BLOCK_K/8]``
int32 tile (rows ``n``, contiguous along the words: vectorized, coalesced loads), unpacks the eight nibbles of
each word with one broadcast shift into ``[BLOCK_N, BLOCK_K/8, 8]``, loads the scales (and zeros) once per group,
not per element (:func:`group_words`; :func:`gemm_config` picks a BLOCK_K that fits the group size), scales in
registers, reshapes to ``[BLOCK_N, BLOCK_K]`` and feeds ``tl.dot(a, tl.trans(w))`` with a float32 accumulator.
Small batches (decode, ``M <= 16``) split K over extra programs that atomically add float32 partial sums, so a
GEMV still fills the GPU; larger ``M`` runs one program per output tile. The INT4 unpacking, group and launch
helpers live in gemm_common.py (shared with fp_weight.py, a8w4.py and int4_fp8.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.formats.int import dequantize_codes
from lowbit.formats.packing import unpack_codes
from lowbit.kernels.gemm_common import (
    FLOAT_DTYPES,
    GemmConfig,
    _sm_count,
    _split,
    check_activation,
    check_launchable,
    check_tensor,
    even_k,
    gemm_config,
    group_block_k,
    group_mode,
    launch_gemm,
    triton,
)

if triton is not None:
    import triton.language as tl

    from lowbit.kernels.gemm_common import dot_acc, group_words, int4_nibbles, int4_words, store_tile, word_nibbles


# ---- torch reference ------------------------------------------------------------------------------------

def w4a16_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x [M, K] @ W_hat^T -> [M, N]`` in ``out_dtype``, decoding with the shared primitives.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``.
        packed: int32 ``[N, K/8]``, pack-quantized INT4 codes (see module docstring).
        scale: float ``[N, K/group_size]``.
        zero: int8 ``[N, K/group_size]`` signed zero points, or None.
        group_size: columns per scale, a multiple of 8 dividing K.
        out_dtype: float16, bfloat16 or float32.

    ``W_hat = s (q - z)``, exact in float32, is rounded once to ``x``'s dtype, the model's (what the kernel feeds
    ``tl.dot``; formats/precision.py: float16 scales of a float32 model give exact float32 weights); the
    product is computed in float32 and rounded once to ``out_dtype``.
    """
    N, K = _check_w4a16(x, packed, scale, zero, group_size, out_dtype)
    codes = unpack_codes(packed, 4, K)  # int8 [N, K]
    w_hat = dequantize_codes(codes, scale.float(), zero, x.dtype)  # [N, K]
    return F.linear(x.float(), w_hat.float()).to(out_dtype)


def _check_w4a16(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> tuple[int, int]:
    """Validate dtypes, shapes and devices; return ``(N, K)``."""
    K = check_activation(x, out_dtype)
    if K % 8:
        raise LowbitError(f"w4a16: K = {K} is not a multiple of 8 (8 INT4 codes per int32 word)")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise LowbitError(f"w4a16: group_size must be a positive multiple of 8, got {group_size!r}")
    if K % group_size:
        raise LowbitError(f"w4a16: group_size {group_size} does not divide K = {K}")
    if packed.dim() != 2:
        raise LowbitError(f"w4a16: packed must be 2-D [N, K/8], got shape {tuple(packed.shape)}")
    N = packed.shape[0]
    check_tensor("packed", packed, (torch.int32,), (N, K // 8), x.device)
    check_tensor("scale", scale, FLOAT_DTYPES, (N, K // group_size), x.device)
    if zero is not None:
        check_tensor("zero", zero, (torch.int8,), (N, K // group_size), x.device)
    return N, K


# GEMV path (no tl.dot): see gemv_config and _w4a16_gemv_kernel. It handles M <= GEMV_KERNEL_MAX_M, but the
# launcher takes it only for M <= GEMV_MAX_M: on the H200 it matched or beat the tl.dot path at M = 1 on most
# Llama shapes and was much slower at M = 16 (BENCHMARKS.md, 2026-11-28, code of commit 7fe429f).
GEMV_KERNEL_MAX_M = 16
GEMV_MAX_M = 1
GEMV_WARPS = 4
GEMV_WORDS_PER_THREAD = 8  # packed int32 words per thread and K tile: two 16-byte loads
GEMV_BLOCK_N = 8
GEMV_PROGRAMS_PER_SM = 8  # target programs per SM (4-warp programs: up to 16 fit at <= 128 registers)
GEMV_NO_SPLIT_TILES_PER_SM = 0.25  # with at least this many N tiles per SM, K is not split
GEMV_PREFETCH = True  # load the next K tile's packed words before unpacking the current one


def gemv_config(M: int, N: int, K: int, device: torch.device, group_size: int | None = None) -> GemmConfig:
    """Tiles of the GEMV path (:func:`_w4a16_gemv_kernel`) for ``M <= GEMV_MAX_M``.

    ``block_m`` is M rounded up to a power of two (every program does all rows). On the GPU a program owns
    ``GEMV_BLOCK_N = 8`` rows of W on 4 warps; each thread loads :data:`GEMV_WORDS_PER_THREAD` = 8 packed words
    per K tile for ``block_m == 1`` (two 16-byte loads: BLOCK_K = 1024), 4 for ``block_m`` 2..4 (BLOCK_K 512)
    and 2 for 8..16 (256), so the ``[block_m, 8, BLOCK_K/8]`` float32 accumulator costs at most 32 registers
    per thread, and the next tile's words are prefetched into registers (:data:`GEMV_PREFETCH`). BLOCK_K
    follows the groups as in :func:`group_block_k` (at least half the preferred width, else per-word scale
    loads). K is split (float32 atomics into a zeroed buffer, then a cast) only when the N tiles give fewer than
    :data:`GEMV_NO_SPLIT_TILES_PER_SM` per SM (N <= 256 rows on 132 SMs: fewer than 33 tiles), so that
    ``N/8 * split`` reaches about :data:`GEMV_PROGRAMS_PER_SM` programs per SM; otherwise the output is stored
    directly in its dtype. Chosen by benchmarks/w4a16_sweep.py on the H200 (BENCHMARKS.md, 2026-11-28, code of
    0848ccf): at M = 1 these tiles without a split beat fp16 and split 16 x 512 tiles on every swept shape (all
    N >= 1024), where the split's zero fill and cast cost more than the extra programs win; the small-N split
    rule is not measured.
    Under the interpreter: 64 x 128 tiles, a pretend 16-program device.
    """
    block_m = 1 << max(0, (M - 1).bit_length())
    if device.type != "cuda":
        block_n, block_k, programs, no_split = 64, 128, 16, 1 << 30
    else:
        sms = _sm_count(device)
        words = GEMV_WORDS_PER_THREAD // (1 if block_m == 1 else 2 if block_m <= 4 else 4)
        block_n = GEMV_BLOCK_N
        block_k = 8 * words * 32 * GEMV_WARPS // block_n
        programs, no_split = GEMV_PROGRAMS_PER_SM * sms, max(1, int(GEMV_NO_SPLIT_TILES_PER_SM * sms))
    block_k = group_block_k(group_size, block_k, max(8, block_k // 2))
    split = 1 if triton.cdiv(N, block_n) >= no_split else _split(N, K, block_n, block_k, programs)
    return GemmConfig(block_m, block_n, block_k, split, GEMV_WARPS if device.type == "cuda" else 4, 1)


# ---- Triton -------------------------------------------------------------------------------------------

def w4a16_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton twin of :func:`w4a16_reference` (same arguments, contiguous, one device): ``[M, N]`` in ``out_dtype``."""
    N, K = _check_w4a16(x, packed, scale, zero, group_size, out_dtype)
    check_launchable(x=x, packed=packed, scale=scale, zero=zero)
    M = x.shape[0]
    if M == 0 or N == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=x.device)
    z = zero if zero is not None else scale  # never read: HAS_ZERO=False compiles the load away
    if M <= GEMV_MAX_M:
        cfg = gemv_config(M, N, K, x.device, group_size)
        # Factoring the group scale out of the sum skips W_hat's rounding to the activation dtype, a relative
        # difference up to 2^-9 (bfloat16) per weight: below the float16/bfloat16 output tolerance, not below
        # float32's, so a float32 output from narrower activations dequantizes each weight as the reference.
        round_w = out_dtype == torch.float32 and x.dtype != torch.float32
        return launch_gemm(
            _w4a16_gemv_kernel, x, N, out_dtype, (packed, scale, z, K // group_size, K // 8), cfg=cfg,
            GROUP_SIZE=group_size, GROUP_MODE=group_mode(group_size, cfg.block_k), HAS_ZERO=zero is not None,
            EVEN_K=even_k(K, cfg), ROUND_W=round_w, PREFETCH=GEMV_PREFETCH,
        )
    cfg = gemm_config(M, N, K, x.device, group_size, x.element_size())
    return launch_gemm(
        _w4a16_kernel, x, N, out_dtype, (packed, scale, z, K // group_size, K // 8), cfg=cfg,
        GROUP_SIZE=group_size, GROUP_MODE=group_mode(group_size, cfg.block_k), HAS_ZERO=zero is not None,
        EVEN_K=even_k(K, cfg), DEQUANT_F16=x.dtype == scale.dtype == torch.float16,
    )


# ---- Triton kernels ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _w4a16_kernel(
        x_ptr, y_ptr, M, N, K,
        w_ptr, s_ptr, z_ptr, n_groups, KW,
        GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
        DEQUANT_F16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past M or N wrap onto real rows, so the loads need no row masks; store_tile drops those rows.
        rows_m = (offs_m % M).to(tl.int64)
        rows_n = (offs_n % N).to(tl.int64)
        x_rows = x_ptr + rows_m[:, None] * K
        w_rows = w_ptr + rows_n[:, None] * KW
        s_rows = s_ptr + rows_n[:, None] * n_groups
        z_rows = z_ptr + rows_n[:, None] * n_groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Scales and zeros are too narrow for the pipeliner's asynchronous copies, so they are prefetched by
        # hand one K tile ahead (the loads' latency hides behind a tile's dequantization and dot).
        kt = pid_k * K_ITERS
        s_next = group_words(s_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
        if HAS_ZERO:
            z_next = group_words(z_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
        # A constexpr trip count: the Triton 3.6 interpreter cannot loop to a runtime bound under numpy >= 2.4,
        # and the compiler gets a static, pipelinable loop. The last split's tiles past K are fully masked.
        for i in range(K_ITERS):
            kt = pid_k * K_ITERS + i
            s = s_next
            # Masked (EVEN_K=False): the tile after the last split's last one lies past K.
            s_next = group_words(s_rows, kt + 1, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, False)
            if HAS_ZERO:
                z = z_next
                z_next = group_words(z_rows, kt + 1, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, False)
            offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:
                a = tl.load(x_rows + offs_k[None, :])
            else:
                a = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            nib = int4_nibbles(w_rows, kt, KW, BLOCK_K, EVEN_K)  # [BLOCK_N, BLOCK_K // 8, 2, 2, 2], q + 8
            # q - z without an int -> float conversion: OR the nibble into the mantissa of a power of two
            # (1024 in float16, 2^23 in float32: that float is exactly 1024 + nibble, resp. 2^23 + nibble) and
            # subtract 1024 + 8 + z, resp. 2^23 + 8 + z. Both differences are exact integers.
            if DEQUANT_F16:
                # float16 x and scales: (q - z) * s is exact in float32, so its float16 product is the same
                # number as the float32 product rounded to float16 (what dequantize_codes computes).
                v = (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                if HAS_ZERO:
                    w = (v - (z.to(tl.int32) + 1032).to(tl.float16)) * s
                else:
                    w = (v - 1032.0) * s
            else:
                v = (nib | 0x4B000000).to(tl.float32, bitcast=True)
                if HAS_ZERO:
                    q = v - (z.to(tl.float32) + 8388616.0)
                else:
                    q = v - 8388616.0
                # Exact in float32, rounded once to the activation (model) dtype, as dequantize_codes does.
                w = (q * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            acc = dot_acc(a, tl.trans(w), acc, DOT_IEEE)
        store_tile(acc, y_ptr, offs_m, offs_n, M, N, SPLIT_K)

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, y_ptr, M, N, K,
        w_ptr, s_ptr, z_ptr, n_groups, KW,
        GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
        ROUND_W: tl.constexpr, PREFETCH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        """Small-M W4A16 without ``tl.dot``: program ``(0, n, k)`` owns rows ``n`` of W (BLOCK_N) and split ``k``.

        Per K tile it loads the ``[BLOCK_N, BLOCK_K/8]`` packed words (contiguous, 16-byte loads), unpacks them in
        registers (:func:`int4_nibbles`) to ``q - z`` (exact float32), multiplies by the ``[BLOCK_M, BLOCK_K]``
        activations broadcast over the rows, sums each word's 8 products in its thread, and scales those
        per-word sums once by their group's scale: ``acc += s_g * sum_k (q - z) x_k``. The float32 accumulator
        ``[BLOCK_M, BLOCK_N, BLOCK_K/8]`` is reduced over the words once, after the K loop, then stored or (split
        K) atomically added. Versus the reference this skips rounding ``W_hat`` to the activation dtype (relative
        2^-11 for float16, 2^-9 for bfloat16 per weight, well inside the 1e-2 * max|y| float16 / bfloat16
        tolerance); ``ROUND_W`` (float32 output from narrower activations, tolerance 1e-4) instead dequantizes
        and rounds each weight as the reference does, then multiplies. ``DOT_IEEE`` is unused (launch_gemm).
        """
        pid_n, pid_k = tl.program_id(1), tl.program_id(2)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = (offs_m % M).to(tl.int64)  # padded rows repeat real ones; store_tile drops them
        rows_n = (offs_n % N).to(tl.int64)
        x_rows = x_ptr + rows_m[:, None] * K
        w_rows = w_ptr + rows_n[:, None] * KW
        s_rows = s_ptr + rows_n[:, None] * n_groups
        z_rows = z_ptr + rows_n[:, None] * n_groups
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        if PREFETCH:  # the packed words are loaded one K tile ahead, so two tiles' loads are in flight
            words_next = int4_words(w_rows, pid_k * K_ITERS, KW, BLOCK_K, EVEN_K)
        for i in range(K_ITERS):
            kt = pid_k * K_ITERS + i
            if PREFETCH:
                words = words_next
                # Masked: the tile after the last split's last one lies past K.
                words_next = int4_words(w_rows, kt + 1, KW, BLOCK_K, False)
            else:
                words = int4_words(w_rows, kt, KW, BLOCK_K, EVEN_K)
            nib = word_nibbles(words)  # [BLOCK_N, BLOCK_K // 8, 2, 2, 2], q + 8
            s = group_words(s_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K).to(tl.float32)
            # q - z exactly: OR the nibble into the mantissa of 2^23 and subtract 2^23 + 8 + z.
            v = (nib | 0x4B000000).to(tl.float32, bitcast=True)
            if HAS_ZERO:
                z = group_words(z_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
                w = v - (z.to(tl.float32) + 8388616.0)
            else:
                w = v - 8388616.0
            if ROUND_W:
                w = (w * s).to(x_ptr.dtype.element_ty).to(tl.float32)
            offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:
                a = tl.load(x_rows + offs_k[None, :])
            else:
                a = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            # Column kt * BLOCK_K + 8 j + 4 a + 2 b + c, the order of int4_nibbles' [j, a, b, c].
            a = tl.reshape(a.to(tl.float32), (BLOCK_M, 1, BLOCK_K // 8, 2, 2, 2))
            p = tl.sum(tl.sum(tl.sum(w[None, :, :, :, :, :] * a, axis=5), axis=4), axis=3)  # per word
            if not ROUND_W:
                p = p * tl.sum(tl.sum(tl.sum(s, axis=4), axis=3), axis=2)[None, :, :]  # sums of unit axes
            acc += p
        store_tile(tl.sum(acc, axis=2), y_ptr, offs_m, offs_n, M, N, SPLIT_K)
