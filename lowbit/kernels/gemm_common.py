"""What the dequantizing GEMMs (w4a16.py, fp_weight.py, a8w4.py, int4_fp8.py) share: launch checks, tile
configurations for H100/H200-class GPUs, the launcher, and the ``@triton.jit`` helpers that load and unpack
INT4 words and per-group values.

Tiles: small batches (decode, ``M <= SMALL_M``) split K over extra programs that atomically add float32
partial sums, so a bandwidth-bound GEMV still fills the GPU; larger ``M`` runs one program per output tile.
BLOCK_K follows the quantization group size (:func:`group_block_k`, :func:`group_mode`) so that per-group
values load once per group, not per element.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.precision import FLOAT_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs (no Linux GPU wheel): the references still work
    triton = None

SMALL_M = 16  # at or below this many rows the split-K (GEMV-like) configuration is used


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
    dtypes: torch.dtype | tuple[torch.dtype, ...],
    shape: tuple[int, ...],
    device: torch.device,
) -> None:
    """Raise LowbitError unless ``t`` is a contiguous tensor of one of ``dtypes``, exactly ``shape``, on ``device``."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if not isinstance(t, torch.Tensor):
        raise LowbitError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise LowbitError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise LowbitError(f"{name} is on {t.device}, expected {device} (all kernel inputs on one device)")
    if not t.is_contiguous():
        raise LowbitError(f"{name} must be contiguous for the Triton kernel")


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
    """Whether the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(dot_acc, InterpretedFunction)


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
DECODE_BLOCK_N, DECODE_BLOCK_K, DECODE_STAGES = 64, 128, 3  # w4a16_sweep.py at M = 16: see gemm_config
DECODE_PROGRAMS_PER_SM = 12  # w4a16_sweep.py at M = 16: see gemm_config

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
    which one 4-warp program per SM cannot. So decode runs small programs (``16 x 64 x 128`` tiles on 4 warps, 3
    stages) and splits K until about :data:`DECODE_PROGRAMS_PER_SM` programs per SM run (at most 16 ways, never
    an empty split); e.g. on 132 SMs ``N x K = 11008 x 4096`` runs 172 N tiles x 8 splits. On the H200 many
    small programs per SM beat one large program per SM, and at M = 16 12 programs per SM with 3 stages matched
    or beat 6 with 4 stages on every Llama shape (BENCHMARKS.md, 2026-11-28, code of 0848ccf); the FP4/FP6 and
    float32-activation configs share these constants untuned.
    ``M <= 64`` uses ``BLOCK_M x 128 x 64`` tiles, larger M ``128 x 128 x 64`` on 8 warps, no split. Float32
    activations (``act_bytes == 4``: an IEEE dot on the FMA units, where larger tiles spill registers) use
    ``BLOCK_M x 64 x 32`` with ``BLOCK_M`` 16, 32 or 64 on 4, 4 or 8 warps, split as decode for ``M <= 16``.
    BLOCK_K then follows :func:`group_block_k` (``group_size``; None for callers without INT4 groups), and the
    pipeline depth (3) is cut to what fits :data:`SMEM_BUDGET`.

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
    def int4_words(w_rows, kt, KW, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The packed int32 words ``[BLOCK_N, BLOCK_K // 8]`` of K tile ``kt`` (8 INT4 codes each).

        ``w_rows``: ``[BLOCK_N, 1]`` pointers to the rows of the packed int32 ``[N, KW]`` weight. Each row loads
        ``BLOCK_K / 8`` consecutive words (vectorized, coalesced). Words past ``KW`` read as 0 unless ``EVEN_K``.
        """
        offs_kw = kt * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        if EVEN_K:
            words = tl.load(w_rows + offs_kw[None, :])
        else:
            words = tl.load(w_rows + offs_kw[None, :], mask=(offs_kw < KW)[None, :], other=0)
        return words

    @triton.jit
    def word_nibbles(words):
        """The unsigned nibbles ``q + 8`` of int32 ``words [BLOCK_N, W]`` as int32 ``[BLOCK_N, W, 2, 2, 2]``.

        Element ``[n, j, a, b, c]`` is nibble ``i = 4a + 2b + c`` (bits ``4i .. 4i+3``) of word ``j``, i.e. column
        ``8 j + i`` of the tile (the pack-quantized layout), so reshaping to ``[BLOCK_N, 8 W]`` gives the columns
        in order. The eight nibbles are shifted out with constant shifts and stacked with ``tl.join``, whose new
        dimensions stay in the registers of the thread that holds the word (a 3-D broadcast shift instead spreads
        the nibbles of a word over 8 threads and doubles the register use).
        """
        # tl.join appends the new axis last, so the first join pairs nibbles 4 apart (axis a), the second 2 apart
        # (b), the third neighbours (c). The & drops the sign bits an arithmetic shift brings in.
        n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
        n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
        return tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))

    @triton.jit
    def int4_nibbles(w_rows, kt, KW, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The nibbles ``q + 8`` of K tile ``kt`` as int32 ``[BLOCK_N, BLOCK_K // 8, 2, 2, 2]``
        (:func:`int4_words` then :func:`word_nibbles`)."""
        return word_nibbles(int4_words(w_rows, kt, KW, BLOCK_K, EVEN_K))

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
            # A [1, 1] tensor, not a scalar: triton 3.9's interpreter gives a scalar comparison an int32
            # (not int1) mask, which tl.load rejects ("mask has unsupported dtype"); compiled, it is the same.
            g = (kt * BLOCK_K) // GROUP + tl.zeros((1, 1), dtype=tl.int32)
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
