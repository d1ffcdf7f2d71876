"""INT4-weight x FP8-activation GEMM of FireQ (ALGORITHMS.md section 8), for Hopper's FP8 tensor cores.

Stored weight (docs/KERNELS.md):

* ``packed`` int32 ``[N, K/8]``: symmetric INT4 codes ``q`` in the pack-quantized layout (element ``k`` in bits
  ``4 (k % 8)`` of word ``k // 8``, stored as ``q + 8``);
* ``scale`` float8_e4m3fn ``[N, K/g]``: group scales ``s_g``;
* ``global_scale`` float32 ``[1]``: the per-tensor factor (FireQ's ``1/p`` power-of-two pre-scale inverse).

Math: ``w_fp8 = e4m3(q * s_g)``, ``y = (xq @ w_fp8^T) * xs * global``. The product ``q * s_g`` is rounded to E4M3
(ties to even, saturating at 448) before the dot, because FireQ's kernel converts codes through a per-group
lookup table of FP8 entries ``{-8 s, ..., 7 s}`` (ALGORITHMS.md 8.3): e.g. ``s = 1.125, q = 7`` gives
``7.875 -> 8.0``. The reference reproduces that rounding, so it is the kernel's numbers, not the pseudo-quant
simulation's.

The Triton kernel loads each INT4 tile as W4A16 does (gemm_common.int4_nibbles: ``[BLOCK_N, BLOCK_K/8]`` words along
their contiguous axis; gemm_common.group_words: scales once per group), decodes it in registers, multiplies by the group
scale in float32 (exact: 4-bit by 4-bit significands) and rounds onto the E4M3 grid: compiled, by the saturating
round-to-nearest-even float32 -> float8e4nv cast itself; interpreted, with ``w8a8.round_e4m3`` first and an exact
cast (see w8a8.py for why the interpreter's cast is not trusted). Then it runs an FP8 x FP8 dot with float32
accumulation. The interpreter's FP8 dot computes on the decoded values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.formats.fp import E4M3, round_to_fp
from lowbit.formats.int import expand_groups
from lowbit.formats.packing import unpack_codes
from lowbit.kernels.w8a8 import (
    FP8,
    check_group,
    check_launch,
    check_tensor,
    gemm_grid,
    int4_gemm_config,
    round_e4m3,
    scale_epilogue,
)
from lowbit.kernels.gemm_common import group_words, int4_nibbles, interpreting


def fireq_fp8_weight(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """``w_fp8 = e4m3(q * s_g)`` as float32 ``[N, K]`` values (all exactly representable in E4M3)."""
    q = unpack_codes(packed, 4, k).float()  # [N, K] signed codes in [-8, 7]
    return round_to_fp(q * expand_groups(scale.float(), k), E4M3)  # q * s_g is exact in float32


def int4_fp8_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y [M, N] = (xq @ e4m3(q * s_g)^T) * xs * global`` in ``out_dtype``.

    Args:
        xq: float8_e4m3fn ``[M, K]`` per-token activations; xs: float32 ``[M, 1]`` their scales.
        packed: int32 ``[N, K/8]`` pack-quantized symmetric INT4 codes.
        scale: float8_e4m3fn ``[N, K/group_size]`` group scales.
        global_scale: float32 ``[1]``.
        group_size: columns per group; divides K.

    The dot is computed in float64 (FP8 x FP8 products are exact; the sum is at least as accurate as the
    kernel's float32 accumulator), then rounded to float32 for the epilogue.
    """
    check_group(group_size, xq.shape[1])
    w = fireq_fp8_weight(packed, scale, xq.shape[1])
    acc = xq.double() @ w.double().t()  # [M, N]
    return scale_epilogue(acc, xs, global_scale, out_dtype)


@triton.jit
def _int4_fp8_kernel(
    x_ptr, xs_ptr, p_ptr, s_ptr, g_ptr, y_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
    GROUP_MODE: tl.constexpr, EVEN_K: tl.constexpr, HW_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; the FP8 weight tile is built ``[BLOCK_N, BLOCK_K]`` in registers.

    ``HW_CAST`` (compiled only): the float32 -> float8e4nv cast itself rounds to nearest even and saturates at 448
    (``cvt.rn.satfinite.e4m3x2.f32``), the same values as ``round_e4m3``; the interpreter's cast mis-rounds, so
    interpreted the values are rounded with ``round_e4m3`` first (see w8a8.py).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M or N wrap onto real rows, so the loads need no row masks; the store drops those rows.
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    x_rows = x_ptr + rows_m[:, None] * K  # [BM, 1]
    p_rows = p_ptr + rows_n[:, None] * (K // 8)  # [BN, 1]
    s_rows = s_ptr + rows_n[:, None] * (K // GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Group scales, once per group (per word at most), are too narrow for the pipeliner's asynchronous copies:
    # they are prefetched by hand one K tile ahead (masked: 0 past K, so w = 0 there).
    s_next = group_words(s_rows, 0, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
    for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        s = s_next.to(tl.float32)
        s_next = group_words(s_rows, kt + 1, K // GROUP, GROUP, GROUP_MODE, BLOCK_N, BLOCK_K, False)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :])  # [BM, BK]
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        nib = int4_nibbles(p_rows, kt, K // 8, BLOCK_K, EVEN_K)  # [BN, BK/8, 2, 2, 2]: q + 8
        # q as float32 without a conversion: the float with bits 0x4B000000 | nibble is 2^23 + nibble.
        q = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        prod = q * s  # exact: 4-bit by 4-bit significands
        if HW_CAST:
            w = prod.to(tl.float8e4nv)
        else:
            w = round_e4m3(prod).to(tl.float8e4nv)  # FireQ's LUT value; the cast is exact
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=BLOCK_K)  # float32 promotion per tile (FP8_DOT_NOTE)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    g = tl.load(g_ptr)
    y = acc * xs[:, None] * g
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def int4_fp8_triton(
    xq: torch.Tensor,
    xs: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton twin of :func:`int4_fp8_reference` (same arguments); returns ``out_dtype [M, N]``."""
    check_launch(xq, out_dtype)
    rows, k = xq.shape
    if k % 8:
        raise LowbitError(f"K={k} must be a multiple of 8 for packed INT4 weights")
    check_group(group_size, k)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise LowbitError("packed must be a 2-D [N, K/8] int32 tensor")
    n, dev = packed.shape[0], xq.device
    check_tensor("xq", xq, FP8, (rows, k), dev)
    check_tensor("xs", xs, torch.float32, (rows, 1), dev)
    check_tensor("packed", packed, torch.int32, (n, k // 8), dev)
    check_tensor("scale", scale, FP8, (n, k // group_size), dev)
    check_tensor("global_scale", global_scale, torch.float32, (1,), dev)
    y = torch.empty(rows, n, dtype=out_dtype, device=dev)
    if rows == 0 or n == 0:
        return y
    cfg = int4_gemm_config(rows, n, k, group_size, dev)
    _int4_fp8_kernel[gemm_grid(rows, n, cfg)](
        xq, xs, packed, scale, global_scale, y, rows, n, k, GROUP=group_size, HW_CAST=not interpreting(), **cfg
    )
    return y
