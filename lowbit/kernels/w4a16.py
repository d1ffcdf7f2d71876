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
GEMV still fills the GPU; larger ``M`` runs one program per output tile. The INT4 unpacking and group helpers
are shared with a8w4.py and int4_fp8.py, the launch helpers with fp_weight.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.formats.int import dequantize_codes
from lowbit.formats.packing import unpack_codes

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs (no Linux GPU wheel): the references still work
    triton = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SMALL_M = 16  # at or below this many rows the split-K (GEMV-like) configuration is used


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

    ``W_hat`` is rounded to the scale dtype and then to ``x``'s dtype (what the kernel feeds ``tl.dot``);
    the product is computed in float32 and rounded once to ``out_dtype``.
    """
    N, K = _check_w4a16(x, packed, scale, zero, group_size, out_dtype)
    codes = unpack_codes(packed, 4, K)  # int8 [N, K]
    w_hat = dequantize_codes(codes, scale.float(), zero, x.dtype, scale.dtype)  # [N, K]
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


# ---- shared launcher helpers (also used by fp_weight.py) ----------------------------------------------

def check_activation(x: torch.Tensor, out_dtype: torch.dtype) -> int:
    """Check a 2-D float activation ``x [M, K]`` and the output dtype; return K."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise LowbitError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in FLOAT_DTYPES:
        raise LowbitError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise LowbitError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    return x.shape[1]


def check_tensor(
    name: str,
    t: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int, ...],
    device: torch.device,
) -> None:
    """Raise LowbitError unless ``t`` has one of ``dtypes``, exactly ``shape`` and lives on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise LowbitError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise LowbitError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise LowbitError(f"{name} is on {t.device} but x is on {device}")


def check_launchable(**tensors: torch.Tensor | None) -> None:
    """Checks only the Triton path needs: triton present, contiguous inputs, a device it can run on."""
    if triton is None:
        raise LowbitError("the Triton kernels need the `triton` package; use the torch backend")
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise LowbitError(f"{name} must be contiguous for the Triton kernel")
    x = next(t for t in tensors.values() if t is not None)
    if x.device.type == "cpu" and not interpreting():
        raise LowbitError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (tests only); use the torch backend")
    if x.device.type not in ("cpu", "cuda"):
        raise LowbitError(f"no Triton kernel for tensors on {x.device}")


def interpreting() -> bool:
    """Whether this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_w4a16_kernel, InterpretedFunction)


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch parameters of one weight-only GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Shared memory the pipelined tiles may take (H100/H200 allow 227 KiB per block; leave room for the compiler's
# layout-conversion scratch).
SMEM_BUDGET = 200 * 1024

# Decode (M <= 16) on the GPU: a bandwidth-bound GEMV needs many small programs in flight per SM to hide HBM
# latency (see gemm_config). Shared with fp_weight.py and w8a8.int4_gemm_config.
DECODE_BLOCK_N, DECODE_BLOCK_K, DECODE_STAGES = 64, 128, 4
DECODE_PROGRAMS_PER_SM = 6

# How a K tile of BLOCK_K columns meets the quantization groups (GROUP_MODE, a kernel constexpr).
TILE_IN_GROUP = 0  # group_size % BLOCK_K == 0: one scale per row and K tile (channel-wise, large groups)
GROUPS_IN_TILE = 1  # BLOCK_K % group_size == 0: a [BLOCK_N, BLOCK_K / group_size] scale tile per K tile
GROUP_GATHER = 2  # neither (group_size has a small power-of-two factor, e.g. 40): one scale load per word


def group_block_k(group_size: int | None, preferred: int, min_block_k: int) -> int:
    """BLOCK_K for a weight with one scale per ``group_size`` columns (``None``: no groups), ``preferred`` a power of 2.

    A power-of-two group up to ``preferred`` keeps ``preferred`` (several whole groups per K tile); otherwise the K
    tile is the largest power of two dividing the group, at most ``preferred`` (each tile inside one group: 128 for
    channel-wise K = 4096 or 11008, 64 for K = 576), unless that is below ``min_block_k`` (what ``tl.dot`` accepts),
    where the kernel falls back to per-word scale loads on ``preferred``-wide tiles.
    """
    if group_size is None or (group_size & (group_size - 1) == 0 and group_size <= preferred):
        return preferred
    block_k = min(preferred, group_size & -group_size)
    return block_k if block_k >= min_block_k else preferred


def group_mode(group_size: int, block_k: int) -> int:
    """The kernels' ``GROUP_MODE`` for ``group_size`` and ``block_k`` (see :data:`TILE_IN_GROUP`)."""
    if group_size % block_k == 0:
        return TILE_IN_GROUP
    if block_k % group_size == 0:
        return GROUPS_IN_TILE
    return GROUP_GATHER


def pipeline_stages(block_m: int, block_n: int, block_k: int, act_bytes: int, most: int) -> int:
    """Pipeline depth (2..``most``) whose shared memory fits :data:`SMEM_BUDGET`.

    Each stage holds an activation tile and a packed INT4 weight tile, ``BLOCK_M*BLOCK_K*act_bytes +
    BLOCK_N*BLOCK_K/2`` bytes; the dequantized weight tile the dot reads (``BLOCK_N*BLOCK_K*act_bytes``) comes once.
    """
    per_stage = block_m * block_k * act_bytes + block_n * block_k // 2
    return max(2, min(most, (SMEM_BUDGET - block_n * block_k * act_bytes) // per_stage))


def gemm_config(
    M: int, N: int, K: int, device: torch.device, group_size: int | None = None, act_bytes: int = 2
) -> GemmConfig:
    """Heuristic tiles for an H100/H200-class GPU (tl.dot needs every tile dim >= 16).

    ``M <= 16`` (decode) is memory bound: a GEMV must keep enough weight loads in flight to cover HBM latency,
    which one 4-warp program per SM cannot. So decode runs small programs (``16 x 64 x 128`` tiles on 4 warps, 4
    stages) and splits K until about :data:`DECODE_PROGRAMS_PER_SM` programs per SM run (at most 16 ways, never
    an empty split); e.g. on 132 SMs ``N x K = 11008 x 4096`` runs 172 N tiles x 4 splits. Measured on an H200
    (CUDA graphs, M = 1, 11008 x 4096): 26 us, vs 41 us for the former one-program-per-SM 64 x 256 config.
    ``M <= 64`` uses ``BLOCK_M x 128 x 64`` tiles, larger M ``128 x 128 x 64`` on 8 warps, no split. Float32
    activations (``act_bytes == 4``: an IEEE dot on the FMA units, where larger tiles spill registers) use
    ``BLOCK_M x 64 x 32`` with ``BLOCK_M`` 16, 32 or 64 on 4, 4 or 8 warps, split as decode for ``M <= 16``.
    BLOCK_K then follows :func:`group_block_k` (``group_size``; None for callers without INT4 groups), and the
    pipeline depth (3, or 4 for decode) is cut to what fits :data:`SMEM_BUDGET`.

    Under the interpreter every tile op costs Python overhead, so it runs 128-wide N and K tiles on a
    pretend 4-SM device: few programs, and split-K still splits, with several tiles per split and fully
    masked tail tiles (as a large K gets on the GPU), so the tests cover the same code paths.
    """
    if device.type != "cuda":
        block_m, block_n, block_k, warps, most = 16 if M <= SMALL_M else 32 if M <= 32 else 64, 128, 128, 4, 3
        programs = 4  # a pretend 4-SM device, one program each
    elif act_bytes == 4:  # float32 x: the IEEE dot runs on FMA units, and larger tiles spill registers
        block_m, block_n, block_k, most = 16 if M <= SMALL_M else 32 if M <= 32 else 64, 64, 32, 3
        warps, programs = 4 if block_m <= 32 else 8, DECODE_PROGRAMS_PER_SM * _sm_count(device)
    elif M <= SMALL_M:
        block_m, block_n, block_k, warps, most = 16, DECODE_BLOCK_N, DECODE_BLOCK_K, 4, DECODE_STAGES
        programs = DECODE_PROGRAMS_PER_SM * _sm_count(device)
    elif M <= 64:
        block_m, block_n, block_k, warps, most = 32 if M <= 32 else 64, 128, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, most = 128, 128, 64, 8, 3
    block_k = group_block_k(group_size, block_k, 16)
    split = _split(N, K, block_n, block_k, programs) if M <= SMALL_M else 1
    stages = pipeline_stages(block_m, block_n, block_k, act_bytes, most)
    return GemmConfig(block_m, block_n, block_k, split, warps, stages)


# GEMV path (no tl.dot): see gemv_config and _w4a16_gemv_kernel. It handles M <= GEMV_KERNEL_MAX_M, but the
# launcher takes it only for M <= GEMV_MAX_M: on the H200 (BENCHMARKS.md) it matched or beat the tl.dot path
# at M = 1 on 4 of 6 Llama shapes (e.g. 29.5 vs 30.8 us at 11008 x 4096) and was 2-3x slower at M = 16.
GEMV_KERNEL_MAX_M = 16
GEMV_MAX_M = 1
GEMV_WARPS = 4
GEMV_WORDS_PER_THREAD = 8  # packed int32 words per thread and K tile: two 16-byte loads
GEMV_BLOCK_N = 16
GEMV_PROGRAMS_PER_SM = 8  # target programs per SM (4-warp programs: up to 16 fit at <= 128 registers)
GEMV_NO_SPLIT_PROGRAMS_PER_SM = 4  # with at least this many N tiles per SM, K is not split


def gemv_config(M: int, N: int, K: int, device: torch.device, group_size: int | None = None) -> GemmConfig:
    """Tiles of the GEMV path (:func:`_w4a16_gemv_kernel`) for ``M <= GEMV_MAX_M``.

    ``block_m`` is M rounded up to a power of two (every program does all rows). On the GPU a program owns
    ``GEMV_BLOCK_N = 16`` rows of W on 4 warps; BLOCK_K is 512 for ``block_m == 1`` (8 words = two 16-byte loads
    per thread per K tile), 256 for ``block_m`` 2..4 (one 16-byte load) and 128 for 8..16 (2 words per thread),
    so the ``[block_m, 16, BLOCK_K/8]`` float32 accumulator costs at most 32 registers per thread. Offline
    sm_90 compiles (fp16, group 128): 128 registers at M = 1, 138 at M = 4, 77 at M = 8, 126-128 at M = 16,
    no spills (BLOCK_K 256 at M = 16 spilled). BLOCK_K follows the groups as in
    :func:`group_block_k` (at least half the preferred width, else per-word scale loads). K is split (float32
    atomics) so ``N/16 * split`` reaches about :data:`GEMV_PROGRAMS_PER_SM` programs per SM, unless the N tiles
    alone give :data:`GEMV_NO_SPLIT_PROGRAMS_PER_SM` per SM (then the output is stored directly in its dtype, no
    zero fill nor cast). E.g. 132 SMs, M = 1: ``11008 x 4096`` runs 688 N tiles of 8 K tiles each, no split;
    ``4096 x 4096`` 256 N tiles x 4 splits of 2 K tiles. Under the interpreter: 64 x 128 tiles, a pretend 16-program device.
    """
    block_m = 1 << max(0, (M - 1).bit_length())
    if device.type != "cuda":
        block_n, block_k, programs, no_split = 64, 128, 16, 1 << 30
    else:
        sms = _sm_count(device)
        words = GEMV_WORDS_PER_THREAD // (1 if block_m == 1 else 2 if block_m <= 4 else 4)
        block_n = GEMV_BLOCK_N
        block_k = 8 * words * 32 * GEMV_WARPS // block_n
        programs, no_split = GEMV_PROGRAMS_PER_SM * sms, GEMV_NO_SPLIT_PROGRAMS_PER_SM * sms
    block_k = group_block_k(group_size, block_k, max(8, block_k // 2))
    split = 1 if triton.cdiv(N, block_n) >= no_split else _split(N, K, block_n, block_k, programs)
    return GemmConfig(block_m, block_n, block_k, split, GEMV_WARPS if device.type == "cuda" else 4, 1)


def _split(N: int, K: int, block_n: int, block_k: int, programs: int) -> int:
    """K splits so that ``N/block_n * split`` programs reach about ``programs`` (1..16, none empty)."""
    n_tiles, k_tiles = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    split = max(1, min(16, k_tiles, programs // n_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # drop splits that would get no K tile


def even_k(K: int, cfg: GemmConfig) -> bool:
    """Whether every K tile of every split lies inside K (the kernel may then drop its K masks)."""
    k_tiles = triton.cdiv(K, cfg.block_k)
    return K % cfg.block_k == 0 and triton.cdiv(k_tiles, cfg.split_k) * cfg.split_k == k_tiles


def launch_gemm(
    kernel: Any,
    x: torch.Tensor,
    N: int,
    out_dtype: torch.dtype,
    weight_args: tuple[Any, ...],
    cfg: GemmConfig | None = None,
    **constexprs: Any,
) -> torch.Tensor:
    """Launch a weight-only GEMM kernel ``kernel(x, y, M, N, K, *weight_args, **meta)``.

    ``meta`` holds the tile sizes of ``cfg`` (default :func:`gemm_config` without groups), ``K_ITERS`` (K tiles
    each split walks; a constexpr, so a kernel is compiled once per layer shape and M bucket), ``SPLIT_K``,
    ``DOT_IEEE`` and ``constexprs``. Allocates ``y [M, N]`` (a zeroed float32 buffer when K is split: the
    programs atomically add into it) and returns it in ``out_dtype``.
    """
    M, K = x.shape
    if M == 0 or N == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=x.device)
    if cfg is None:
        cfg = gemm_config(M, N, K, x.device, act_bytes=x.element_size())
    k_iters = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k)  # K tiles per split
    if cfg.split_k > 1:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), cfg.split_k)
    kernel[grid](
        x, y, M, N, K, *weight_args,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_ITERS=k_iters, SPLIT_K=cfg.split_k,
        DOT_IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )
    return y if y.dtype == out_dtype else y.to(out_dtype)


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
        # Factoring the group scale out of the sum skips W_hat's rounding to the scale and activation dtypes,
        # a relative difference up to 2^-9 (bfloat16) per weight: below the float16/bfloat16 output tolerance,
        # not below float32's, so a float32 output from narrower inputs dequantizes each weight as the reference.
        round_w = out_dtype == torch.float32 and (x.dtype != torch.float32 or scale.dtype != torch.float32)
        return launch_gemm(
            _w4a16_gemv_kernel, x, N, out_dtype, (packed, scale, z, K // group_size, K // 8), cfg=cfg,
            GROUP_SIZE=group_size, GROUP_MODE=group_mode(group_size, cfg.block_k), HAS_ZERO=zero is not None,
            EVEN_K=even_k(K, cfg), ROUND_W=round_w,
        )
    cfg = gemm_config(M, N, K, x.device, group_size, x.element_size())
    return launch_gemm(
        _w4a16_kernel, x, N, out_dtype, (packed, scale, z, K // group_size, K // 8), cfg=cfg,
        GROUP_SIZE=group_size, GROUP_MODE=group_mode(group_size, cfg.block_k), HAS_ZERO=zero is not None,
        EVEN_K=even_k(K, cfg), DEQUANT_F16=x.dtype == scale.dtype == torch.float16,
    )


if triton is not None:

    @triton.jit
    def dot_acc(a, b, acc, IEEE: tl.constexpr):
        """``acc + a @ b``; float32 operands use exact IEEE products (no TF32)."""
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def store_tile(acc, y_ptr, offs_m, offs_n, M, N, SPLIT_K: tl.constexpr):
        """Write the float32 ``[BLOCK_M, BLOCK_N]`` tile: a plain store, or an atomic add of a split-K partial."""
        ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")

    @triton.jit
    def int4_nibbles(w_rows, kt, KW, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The unsigned nibbles ``q + 8`` of K tile ``kt`` as int32 ``[BLOCK_N, BLOCK_K // 8, 2, 2, 2]``.

        ``w_rows``: ``[BLOCK_N, 1]`` pointers to the rows of the packed int32 ``[N, KW]`` weight. Each row loads
        ``BLOCK_K / 8`` consecutive words (vectorized, coalesced). Element ``[n, j, a, b, c]`` is nibble
        ``i = 4a + 2b + c`` (bits ``4i .. 4i+3``) of word ``j``, i.e. column ``kt * BLOCK_K + 8 j + i`` (the
        pack-quantized layout), so reshaping to ``[BLOCK_N, BLOCK_K]`` gives the columns in order. The eight
        nibbles are shifted out with constant shifts and stacked with ``tl.join``, whose new dimensions stay in
        the registers of the thread that holds the word (a 3-D broadcast shift instead spreads the nibbles of a
        word over 8 threads and doubles the register use). Words past ``KW`` read as 0 unless ``EVEN_K``.
        """
        offs_kw = kt * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        if EVEN_K:
            words = tl.load(w_rows + offs_kw[None, :])
        else:
            words = tl.load(w_rows + offs_kw[None, :], mask=(offs_kw < KW)[None, :], other=0)
        # tl.join appends the new axis last, so the first join pairs nibbles 4 apart (axis a), the second 2 apart
        # (b), the third neighbours (c). The & drops the sign bits an arithmetic shift brings in.
        n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
        n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
        return tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))

    @triton.jit
    def group_words(
        g_rows, kt, n_groups, GROUP: tl.constexpr, GROUP_MODE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """Per-group values (scales, zeros, multipliers) for K tile ``kt``, one per packed word.

        ``g_rows``: ``[BLOCK_N, 1]`` pointers to the rows of an ``[N, n_groups]`` tensor. Returns ``[BLOCK_N, 1]``
        (TILE_IN_GROUP: the tile lies in one group) or ``[BLOCK_N, BLOCK_K // 8]`` (the value of each word's
        group; a word never straddles groups, as ``GROUP % 8 == 0``) with three unit dimensions appended, so it
        broadcasts against :func:`int4_nibbles` within each thread. Groups past ``n_groups`` read as 0 unless
        ``EVEN_K`` (``other=0.0``: the interpreter cannot cast an integer 0 to float8).
        """
        if GROUP_MODE == 0:  # TILE_IN_GROUP: one load per row
            g = (kt * BLOCK_K) // GROUP
            if EVEN_K:
                t = tl.load(g_rows + g)
            else:
                t = tl.load(g_rows + g, mask=g < n_groups, other=0.0)
        elif GROUP_MODE == 1:  # GROUPS_IN_TILE: BLOCK_K / GROUP groups per row, each repeated over GROUP/8 words
            offs_g = kt * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
            if EVEN_K:
                t = tl.load(g_rows + offs_g[None, :])
            else:
                t = tl.load(g_rows + offs_g[None, :], mask=(offs_g < n_groups)[None, :], other=0.0)
            if GROUP > 8:
                t = tl.broadcast_to(t[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 8))
                t = tl.reshape(t, (BLOCK_N, BLOCK_K // 8))
        else:  # GROUP_GATHER: the group of each word
            g = (kt * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)) // (GROUP // 8)
            if EVEN_K:
                t = tl.load(g_rows + g[None, :])
            else:
                t = tl.load(g_rows + g[None, :], mask=(g < n_groups)[None, :], other=0.0)
        return t[:, :, None, None, None]

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
                # Rounded to the scale dtype first, as dequantize_codes does, then to the activation dtype.
                w = (q * s.to(tl.float32)).to(s_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            acc = dot_acc(a, tl.trans(w), acc, DOT_IEEE)
        store_tile(acc, y_ptr, offs_m, offs_n, M, N, SPLIT_K)

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, y_ptr, M, N, K,
        w_ptr, s_ptr, z_ptr, n_groups, KW,
        GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
        ROUND_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        """Small-M W4A16 without ``tl.dot``: program ``(0, n, k)`` owns rows ``n`` of W (BLOCK_N) and split ``k``.

        Per K tile it loads the ``[BLOCK_N, BLOCK_K/8]`` packed words (contiguous, 16-byte loads), unpacks them in
        registers (:func:`int4_nibbles`) to ``q - z`` (exact float32), multiplies by the ``[BLOCK_M, BLOCK_K]``
        activations broadcast over the rows, sums each word's 8 products in its thread, and scales those
        per-word sums once by their group's scale: ``acc += s_g * sum_k (q - z) x_k``. The float32 accumulator
        ``[BLOCK_M, BLOCK_N, BLOCK_K/8]`` is reduced over the words once, after the K loop, then stored or (split
        K) atomically added. Versus the reference this skips rounding ``W_hat`` to the scale and activation
        dtypes (relative 2^-11 for float16, 2^-9 for bfloat16 per weight, well inside the 1e-2 * max|y| float16 /
        bfloat16 tolerance); ``ROUND_W`` (float32 output from narrower inputs, tolerance 1e-4) instead dequantizes
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
        for i in range(K_ITERS):
            kt = pid_k * K_ITERS + i
            nib = int4_nibbles(w_rows, kt, KW, BLOCK_K, EVEN_K)  # [BLOCK_N, BLOCK_K // 8, 2, 2, 2], q + 8
            s = group_words(s_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K).to(tl.float32)
            # q - z exactly: OR the nibble into the mantissa of 2^23 and subtract 2^23 + 8 + z.
            v = (nib | 0x4B000000).to(tl.float32, bitcast=True)
            if HAS_ZERO:
                z = group_words(z_rows, kt, n_groups, GROUP_SIZE, GROUP_MODE, BLOCK_N, BLOCK_K, EVEN_K)
                w = v - (z.to(tl.float32) + 8388616.0)
            else:
                w = v - 8388616.0
            if ROUND_W:
                w = (w * s).to(s_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
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
