"""A8W4 GEMM of DGQ (dual-grained quantization, ALGORITHMS.md section 7): INT8 activations x INT4 weights.

The weight is stored in two grains (docs/KERNELS.md):

* ``packed`` int32 ``[N, K/8]``: INT4 codes ``q`` in the pack-quantized layout (element ``k`` in bits
  ``4 (k % 8)`` of word ``k // 8``, stored as ``q + 8``);
* ``m`` int8 ``[N, K/g]``: integer group multipliers (>= 1), ``zero`` int8 ``[N, K/g]`` signed zero points or None;
* ``s8`` float32 ``[N, 1]``: one float scale per output channel.

``w8 = (q - z) * m`` is an INT8 weight (the quantizer keeps it in [-127, 127]), so the GEMM is an exact
INT8 x INT8 -> INT32 product with a float epilogue: ``y = (xq @ w8^T) * xs * s8^T``.

Unlike DGQ's released kernel, which first writes the whole INT8 weight to a global-memory buffer and then runs a
CUTLASS INT8 GEMM (ALGORITHMS.md 7.5), the Triton kernel expands each INT4 tile to INT8 in registers inside the
main loop and feeds it straight to the INT8 tensor-core dot: the weight crosses memory once, at 4 bits. The tile
loads are W4A16's (gemm_common.int4_nibbles: ``[BLOCK_N, BLOCK_K/8]`` words along their contiguous axis;
gemm_common.group_words: multipliers and zeros once per group), the tiles ``w8a8.int4_gemm_config``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.formats.int import expand_groups
from lowbit.formats.packing import unpack_codes
from lowbit.kernels.w8a8 import (
    MAX_K_INT32,
    check_group,
    check_launch,
    check_tensor,
    gemm_grid,
    int4_gemm_config,
    scale_epilogue,
)
from lowbit.kernels.gemm_common import group_words, int4_nibbles


def dgq_int8_weight(packed: torch.Tensor, m: torch.Tensor, zero: torch.Tensor | None, k: int) -> torch.Tensor:
    """``w8 = (q - z) * m`` as int8 ``[N, K]`` from the stored tensors (shapes as in :func:`a8w4_reference`).

    Raises LowbitError if a product leaves [-127, 127] (a checkpoint the DGQ quantizer cannot have written).
    """
    q = unpack_codes(packed, 4, k).to(torch.int32)  # [N, K] signed codes in [-8, 7]
    if zero is not None:
        q = q - expand_groups(zero.to(torch.int32), k)
    w8 = q * expand_groups(m.to(torch.int32), k)  # [N, K]
    if w8.numel() and int(w8.abs().max()) > 127:
        raise LowbitError("DGQ weight (q - z) * m leaves the INT8 range [-127, 127]; the checkpoint is invalid")
    return w8.to(torch.int8)


def a8w4_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    packed: torch.Tensor,
    m: torch.Tensor,
    zero: torch.Tensor | None,
    s8: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y [M, N] = (xq @ w8^T) * xs * s8^T`` with ``w8 = (q - z) * m``, in ``out_dtype``.

    Args:
        xq: int8 ``[M, K]`` per-token activation codes; xs: float32 ``[M, 1]`` their scales.
        packed: int32 ``[N, K/8]`` pack-quantized INT4 codes.
        m: int8 ``[N, K/group_size]`` group multipliers (>= 1); zero: int8 ``[N, K/group_size]`` or None.
        s8: float32 ``[N, 1]`` per-channel scales.
        group_size: columns per group; divides K.

    The integer product is computed in float64, where it is exact (|sum| <= K 128 127), then rounded once to
    float32 like the kernel's int32 accumulator.
    """
    check_group(group_size, xq.shape[1])
    w8 = dgq_int8_weight(packed, m, zero, xq.shape[1])
    acc = xq.double() @ w8.double().t()  # [M, N], exact
    return scale_epilogue(acc, xs, s8, out_dtype)


@triton.jit
def _a8w4_kernel(
    x_ptr, xs_ptr, p_ptr, m_ptr, z_ptr, s8_ptr, y_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, GROUP_MODE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; the INT8 weight tile is built ``[BLOCK_N, BLOCK_K]`` in registers."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M or N wrap onto real rows, so the loads need no row masks; the store drops those rows.
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    x_rows = x_ptr + rows_m[:, None] * K  # [BM, 1]
    p_rows = p_ptr + rows_n[:, None] * (K // 8)  # [BN, 1]
    m_rows = m_ptr + rows_n[:, None] * (K // GROUP)
    z_rows = z_ptr + rows_n[:, None] * (K // GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # Multipliers and zeros, once per group (per word at most), are too narrow for the pipeliner's asynchronous
    # copies: they are prefetched by hand one K tile ahead (masked, as the tile after the last one lies past K).
    m_next = group_words(m_rows, 0, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
    if HAS_ZERO:
        z_next = group_words(z_rows, 0, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
    for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        mult = m_next.to(tl.int32)
        m_next = group_words(m_rows, kt + 1, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, False)
        if HAS_ZERO:
            c = z_next.to(tl.int32) + 8
            z_next = group_words(z_rows, kt + 1, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, False)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :])  # [BM, BK]
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
        nib = int4_nibbles(p_rows, kt, K // 8, BLOCK_K, EVEN_K)  # [BN, BK/8, 2, 2, 2]: q + 8
        if HAS_ZERO:
            w8 = ((nib - c) * mult).to(tl.int8)  # (q - z) * m in [-127, 127]
        else:
            w8 = ((nib - 8) * mult).to(tl.int8)
        w8 = tl.reshape(w8, (BLOCK_N, BLOCK_K))  # masked groups have m = 0: w8 = 0 past K
        acc = tl.dot(a, tl.trans(w8), acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    s8 = tl.load(s8_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * s8[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def a8w4_triton(
    xq: torch.Tensor,
    xs: torch.Tensor,
    packed: torch.Tensor,
    m: torch.Tensor,
    zero: torch.Tensor | None,
    s8: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton twin of :func:`a8w4_reference` (same arguments); returns ``out_dtype [M, N]``.

    Products outside [-127, 127] are not checked here (that would cost a pass over the weight per call): they
    wrap in the int8 cast, and the reference rejects them.
    """
    check_launch(xq, out_dtype)
    rows, k = xq.shape
    if k % 8:
        raise LowbitError(f"K={k} must be a multiple of 8 for packed INT4 weights")
    check_group(group_size, k)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise LowbitError("packed must be a 2-D [N, K/8] int32 tensor")
    n, dev = packed.shape[0], xq.device
    groups = k // group_size
    check_tensor("xq", xq, torch.int8, (rows, k), dev)
    check_tensor("xs", xs, torch.float32, (rows, 1), dev)
    check_tensor("packed", packed, torch.int32, (n, k // 8), dev)
    check_tensor("m", m, torch.int8, (n, groups), dev)
    if zero is not None:
        check_tensor("zero", zero, torch.int8, (n, groups), dev)
    check_tensor("s8", s8, torch.float32, (n, 1), dev)
    if k >= MAX_K_INT32:
        raise LowbitError(f"K={k} is too large for an exact int32 accumulator (limit {MAX_K_INT32 - 1})")
    y = torch.empty(rows, n, dtype=out_dtype, device=dev)
    if rows == 0 or n == 0:
        return y
    cfg = int4_gemm_config(rows, n, k, group_size, dev)
    _a8w4_kernel[gemm_grid(rows, n, cfg)](
        xq, xs, packed, m, m if zero is None else zero, s8, y, rows, n, k,
        GROUP=group_size, HAS_ZERO=zero is not None, **cfg,
    )
    return y
