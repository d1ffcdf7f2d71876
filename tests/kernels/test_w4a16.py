"""W4A16: the Triton kernel against its torch reference, the reference against an independent decode, and
the launcher's input checks. Without a GPU the kernel runs under the Triton interpreter (conftest.py)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_codes
from lowbit.kernels import gemm_common, w4a16
from lowbit.kernels.w4a16 import GEMV_KERNEL_MAX_M as GEMV_MAX_M, w4a16_reference, w4a16_triton

# Tolerance (docs/KERNELS.md "Tolerances"): max|y_triton - y_ref| <= TOL * max|y_ref|, TOL = 1e-2 for
# float16/bfloat16 outputs and 1e-4 for float32. Both sides decode bit-identical weights; they differ only
# in the order of the float32 accumulation (tiles, split-K atomics) and the final rounding to out_dtype,
# errors of order sqrt(K) * eps * max|y|, while a wrong nibble, group or scale index is off by ~max|y|.
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _gemv_for_every_small_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise the GEMV kernel over its whole range (M <= 16): the launcher's production threshold is lower."""
    monkeypatch.setattr(w4a16, "GEMV_MAX_M", w4a16.GEMV_KERNEL_MAX_M)


def make_weight(
    N: int, K: int, group: int, scale_dtype: torch.dtype, asym: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random packed INT4 codes [N, K/8], scales [N, K/group] in scale_dtype and int8 zeros (or None)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, K // group, generator=g) * 0.02 + 0.002).to(scale_dtype)
    zero = torch.randint(-8, 8, (N, K // group), generator=g, dtype=torch.int8) if asym else None
    return pack_codes(codes, 4), scale, zero


def make_x(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(y: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype == out_dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert scale > 0 and err <= TOL[out_dtype] * scale, f"max error {err:.3g} vs max|y| {scale:.3g}"


def run_parity(M: int, N: int, K: int, group: int, x_dtype: torch.dtype, scale_dtype: torch.dtype,
               out_dtype: torch.dtype, asym: bool, device: str, seed: int = 0) -> None:
    packed, scale, zero = make_weight(N, K, group, scale_dtype, asym, seed)
    x = make_x(M, K, x_dtype, seed + 1)
    args = [t.to(device) if t is not None else None for t in (x, packed, scale, zero)]
    y = w4a16_triton(*args, group, out_dtype)
    ref = w4a16_reference(*args, group, out_dtype)
    assert_close(y.cpu(), ref.cpu(), out_dtype)


# (M, N, K, group): M <= GEMV_MAX_M takes the GEMV path, larger M the tiled GEMM. Interpreted, BLOCK_K is 128 for
# power-of-two groups up to 128 (several groups per K tile), the largest power of two dividing the group for
# larger groups (group 192 or 576: 64, group 96: 32; K tiles inside one group), and 128 with per-word scale loads
# for group 40 (gemm_common.group_block_k). Most K leave a partial last K tile; interpreted, (5, 64, 576) runs 3 splits
# of 2 tiles, the last one past K, and (3, 40, 320) 3 splits of 2 channel-wise tiles (gemm_common.gemm_config).
SMALL = [
    (1, 96, 192, 64),
    (5, 64, 576, 64),
    (16, 40, 192, 192),  # channel-wise scales (group == K), N not a multiple of the tile
    (17, 48, 96, 32),
    (33, 80, 200, 40),
    (70, 24, 96, 96),
    (2, 64, 512, 32),  # 4 groups per K tile, 4 splits of 1 tile: no K masks (EVEN_K)
    (3, 40, 320, 320),  # channel-wise, group > BLOCK_K (64): 5 K tiles per group, the last split past K
    (20, 32, 256, 16),  # 8 groups per K tile, no K masks
]


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
@pytest.mark.parametrize("M,N,K,group", SMALL)
def test_parity_small(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: str) -> None:
    run_parity(M, N, K, group, dtype, dtype, dtype, asym=(M + N) % 2 == 0, device=device, seed=M)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("x_dtype,scale_dtype,out_dtype", [(BF16, F16, F32), (F32, F16, F32), (F16, F32, BF16)])
def test_parity_mixed_dtypes(x_dtype: torch.dtype, scale_dtype: torch.dtype, out_dtype: torch.dtype,
                             asym: bool, device: str) -> None:
    run_parity(5, 64, 576, 64, x_dtype, scale_dtype, out_dtype, asym, device)
    run_parity(33, 48, 96, 32, x_dtype, scale_dtype, out_dtype, asym, device)


# SmolLM2-135M's linears (N x K): q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536.
@pytest.mark.parametrize("M,N,K,group,dtype", [
    (1, 576, 1536, 128, F16),
    (1, 1536, 576, 64, F16),
    (1, 192, 576, 576, BF16),
    (5, 576, 576, 32, BF16),
    (33, 192, 576, 64, F16),
], ids=["down", "up", "k-channel", "q-m5", "k-m33"])
def test_parity_smollm2_shapes(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: str) -> None:
    run_parity(M, N, K, group, dtype, dtype, dtype, asym=True, device=device, seed=N + K)


# The GEMV path (M <= GEMV_MAX_M, no tl.dot): interpreted it runs 64 x 128 tiles on a pretend 16-program device
# (w4a16.gemv_config), so these N split K. (N, K, group): several groups per K tile, channel-wise (3 K tiles per
# group), per-word scale loads (group 40; channel-wise K = 576, whose power-of-two factor 64 < 128 / 2), one
# scale per word (group 8), partial last K tiles (K = 320, 200, 328), N not a multiple of the tile.
GEMV_SHAPES = [
    (96, 256, 32),
    (40, 320, 64),  # K = 2.5 tiles
    (64, 512, 128),  # no K masks (EVEN_K)
    (48, 384, 384),  # channel-wise
    (32, 200, 40),  # per-word scale loads, partial tile
    (24, 328, 8),  # group 8: one scale per word, partial tile
]


@pytest.mark.parametrize("M", sorted({1, 2, 3, 4, GEMV_MAX_M}))
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_gemv_parity(M: int, dtype: torch.dtype, asym: bool, device: str) -> None:
    assert M <= GEMV_MAX_M
    for i, (N, K, group) in enumerate(GEMV_SHAPES):
        run_parity(M, N, K, group, dtype, dtype, dtype, asym, device, seed=M + 10 * i)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_gemv_prefetch_parity(M: int, asym: bool, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GEMV with its packed words loaded one K tile ahead: the same sums (the prefetch of the tile after the
    # last split's last one is masked), over split K, partial tiles and every group mode.
    monkeypatch.setattr(w4a16, "GEMV_PREFETCH", True)
    for i, (N, K, group) in enumerate(GEMV_SHAPES):
        run_parity(M, N, K, group, F16, F16, F16, asym, device, seed=100 + M + 10 * i)


@pytest.mark.parametrize("M", [1, 4, GEMV_MAX_M])
@pytest.mark.parametrize("x_dtype,scale_dtype,out_dtype", [
    (BF16, F16, F32), (F16, F16, F32), (F32, F16, F32), (F16, F32, BF16), (BF16, BF16, F16),
])
def test_gemv_parity_mixed_dtypes(M: int, x_dtype: torch.dtype, scale_dtype: torch.dtype, out_dtype: torch.dtype,
                                  device: str) -> None:
    # float32 outputs from narrower inputs take ROUND_W (weights rounded as the reference rounds them)
    run_parity(M, 64, 576, 64, x_dtype, scale_dtype, out_dtype, asym=True, device=device)
    run_parity(M, 40, 200, 200, x_dtype, scale_dtype, out_dtype, asym=False, device=device)


# M = 1 of down and up: test_parity_smollm2_shapes.
@pytest.mark.parametrize("M,N,K,group,dtype", [
    (GEMV_MAX_M, 576, 1536, 128, F16),
    (4, 1536, 576, 64, BF16),
    (1, 192, 576, 576, F16),  # channel-wise, per-word scale loads on a 2-tile K with a partial tile, split
    (2, 192, 576, 576, BF16),
    (GEMV_MAX_M, 192, 576, 576, F16),
    (1, 192, 576, 32, F32),
    (4, 192, 576, 64, F32),
], ids=["down-mmax", "up-m4", "k-channel-m1", "k-channel-m2", "k-channel-mmax", "k-g32-f32-m1", "k-g64-f32-m4"])
def test_gemv_smollm2_shapes(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: str) -> None:
    run_parity(M, N, K, group, dtype, dtype, dtype, asym=M % 2 == 0, device=device, seed=N + K + M)


@pytest.mark.parametrize("M,N,K,group", [(1, 96, 192, 64), (5, 64, 576, 64), (3, 40, 320, 320)])
def test_split_k_dot_path(M: int, N: int, K: int, group: int, device: str, monkeypatch) -> None:
    # GEMV_MAX_M = 0 sends small M to the split-K tl.dot path (gemm_config), otherwise unused by w4a16.
    monkeypatch.setattr(w4a16, "GEMV_MAX_M", 0)
    for dtype in (F16, F32):
        run_parity(M, N, K, group, dtype, dtype, dtype, asym=True, device=device, seed=M)


def test_gemv_config_gpu_shapes(monkeypatch) -> None:
    # The GPU configs (132 SMs), computed without a GPU.
    monkeypatch.setattr(w4a16, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    cfg = w4a16.gemv_config(1, 11008, 4096, cuda, 128)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == (1, 8, 1024, 1)  # 1376 N tiles: no split
    cfg = w4a16.gemv_config(1, 4096, 4096, cuda, 128)
    assert (cfg.block_n, cfg.block_k, cfg.split_k) == (8, 1024, 1)  # 512 N tiles: no split
    cfg = w4a16.gemv_config(1, 192, 4096, cuda, 128)
    assert (cfg.block_n, cfg.block_k, cfg.split_k) == (8, 1024, 4)  # 24 N tiles < 33: split to ~8 per SM
    cfg = w4a16.gemv_config(16, 4096, 14336, cuda, 128)
    assert (cfg.block_m, cfg.block_k) == (16, 256)
    cfg = w4a16.gemv_config(3, 4096, 11008, cuda, 11008)  # channel-wise, 11008 = 256 * 43
    assert (cfg.block_m, cfg.block_k) == (4, 256) and gemm_common.group_mode(11008, cfg.block_k) == gemm_common.TILE_IN_GROUP


def independent_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """W_hat [N, K] decoded by hand (bit shifts on the words, no formats/ helpers), in the scale dtype."""
    N, words = packed.shape
    K = words * 8
    k = torch.arange(K)
    nibble = (packed.long()[:, k // 8] >> (4 * (k % 8))) & 0xF  # [N, K] unsigned q + 8
    group = K // scale.shape[1]
    q = nibble.double() - 8
    if zero is not None:
        q = q - zero.double()[:, k // group]
    return (q * scale.double()[:, k // group]).to(scale.dtype)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_reference_equals_independent_decode(dtype: torch.dtype, asym: bool) -> None:
    packed, scale, zero = make_weight(24, 128, 32, dtype, asym, seed=7)
    x = make_x(3, 128, dtype, seed=8)
    w = independent_weight(packed, scale, zero)
    expected = (x.float() @ w.float().T).to(dtype)
    assert torch.equal(w4a16_reference(x, packed, scale, zero, 32, dtype), expected)


def test_golden_word(device: str) -> None:
    # word 0x76543210 holds unsigned nibbles 0..7, i.e. q = -8..-1; with z = -8 and s = 0.5, W = 0, 0.5, ..., 3.5
    packed = torch.tensor([[0x76543210, 0x76543210]], dtype=torch.int32, device=device)  # N = 1, K = 16
    scale = torch.full((1, 2), 0.5, dtype=F32, device=device)
    zero = torch.full((1, 2), -8, dtype=torch.int8, device=device)
    x = torch.ones(1, 16, dtype=F32, device=device)
    for fn in (w4a16_reference, w4a16_triton):
        assert fn(x, packed, scale, zero, 8, F32).cpu().tolist() == [[28.0]]  # 2 * (0 + 0.5 + ... + 3.5)


def _valid() -> dict:
    packed, scale, zero = make_weight(16, 64, 32, F16, True, seed=3)
    return dict(x=make_x(2, 64, F16, seed=4), packed=packed, scale=scale, zero=zero, group_size=32, out_dtype=F16)


BAD: dict[str, Callable[[dict], None]] = {
    "x int8": lambda a: a.update(x=a["x"].to(torch.int8)),
    "x 3-D": lambda a: a.update(x=a["x"][None]),
    "packed int64": lambda a: a.update(packed=a["packed"].long()),
    "packed rows": lambda a: a.update(packed=a["packed"][:8]),
    "scale shape": lambda a: a.update(scale=a["scale"][:, :1]),
    "scale int": lambda a: a.update(scale=a["scale"].to(torch.int32)),
    "zero int32": lambda a: a.update(zero=a["zero"].int()),
    "group not dividing K": lambda a: a.update(group_size=48, scale=a["scale"][:, :1], zero=a["zero"][:, :1]),
    "group not a multiple of 8": lambda a: a.update(group_size=4),
    "out_dtype int": lambda a: a.update(out_dtype=torch.int32),
    "x non-contiguous": lambda a: a.update(x=torch.randn(64, 2, dtype=F16).T),
    "scale non-contiguous": lambda a: a.update(scale=torch.rand(2, 16, dtype=F16).T),
    "device mismatch": lambda a: a.update(packed=a["packed"].to("meta")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_launcher_rejects_bad_input(case: str) -> None:
    args = _valid()
    BAD[case](args)
    with pytest.raises(LowbitError):
        w4a16_triton(**args)


def test_reference_rejects_bad_shapes() -> None:
    args = _valid()
    args["scale"] = args["scale"][:, :1]
    with pytest.raises(LowbitError):
        w4a16_reference(**args)
