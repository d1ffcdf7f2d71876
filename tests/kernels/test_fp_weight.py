"""FP4 (MXFP4, NVFP4) and FP6 weight-only GEMMs: Triton against the torch reference, the reference against
an independent decode, and the launchers' input checks. Without a GPU the kernels run interpreted."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.blockfp import pack_fp4, pack_fp6, quantize_fp_rows, quantize_mxfp4, quantize_nvfp4
from lowbit.formats.fp import E2M3, E3M2
from lowbit.kernels.fp_weight import fp4_reference, fp4_triton, fp6_reference, fp6_triton

# Tolerance (docs/KERNELS.md "Tolerances"): max|y_triton - y_ref| <= TOL * max|y_ref|, TOL = 1e-2 for
# float16/bfloat16 outputs and 1e-4 for float32. The kernel's decoded weights are exact (FP4 * block scale
# and FP6 codes fit float16/bfloat16), so the two sides differ only in float32 summation order and the
# final rounding to out_dtype (~sqrt(K) * eps * max|y|); a wrong nibble, block or scale is off by ~max|y|.
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mx_weight(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, None]:
    codes, e8m0 = quantize_mxfp4(randn(N, K, seed=seed) * 0.05)
    return pack_fp4(codes), e8m0, None


def nv_weight(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scale_codes, g = quantize_nvfp4(randn(N, K, seed=seed) * 0.05)
    return pack_fp4(codes), scale_codes.view(torch.float8_e4m3fn), g.reshape(1)


def fp6_weight(N: int, K: int, fmt: str, scale_dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    codes, scale = quantize_fp_rows(randn(N, K, seed=seed) * 0.05, {"e3m2": E3M2, "e2m3": E2M3}[fmt])
    return (*pack_fp6(codes), scale.to(scale_dtype))


def assert_close(y: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype == out_dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert scale > 0 and err <= TOL[out_dtype] * scale, f"max error {err:.3g} vs max|y| {scale:.3g}"


def on(device: str, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(device) if t is not None else None for t in tensors]


def check_fp4(M: int, N: int, K: int, block: int, dtype: torch.dtype, device: str,
              out_dtype: torch.dtype | None = None) -> None:
    out_dtype = out_dtype or dtype
    weight = (mx_weight if block == 32 else nv_weight)(N, K, seed=N + K)
    args = on(device, randn(M, K, seed=M).to(dtype), *weight)
    assert_close(fp4_triton(*args, block, out_dtype).cpu(), fp4_reference(*args, block, out_dtype).cpu(), out_dtype)


def check_fp6(M: int, N: int, K: int, fmt: str, dtype: torch.dtype, device: str,
              out_dtype: torch.dtype | None = None) -> None:
    out_dtype = out_dtype or dtype
    args = on(device, randn(M, K, seed=M).to(dtype), *fp6_weight(N, K, fmt, dtype, seed=N + K))
    assert_close(fp6_triton(*args, fmt, out_dtype).cpu(), fp6_reference(*args, fmt, out_dtype).cpu(), out_dtype)


# (M, N, K): M <= 16 runs split-K with BLOCK_K 128, larger M the tiled GEMM with BLOCK_K 64 on the GPU and
# 128 interpreted; each K leaves a partial last K tile (192 and 576 vs 128; 96 and 160 vs 64 and 128).
SMALL = [(1, 96, 192), (5, 64, 576), (17, 40, 96), (33, 48, 160)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SMALL)
@pytest.mark.parametrize("block", [32, 16], ids=["mx", "nv"])
def test_fp4_parity_small(block: int, M: int, N: int, K: int, dtype: torch.dtype, device: str) -> None:
    check_fp4(M, N, K, block, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SMALL)
@pytest.mark.parametrize("fmt", ["e3m2", "e2m3"])
def test_fp6_parity_small(fmt: str, M: int, N: int, K: int, dtype: torch.dtype, device: str) -> None:
    check_fp6(M, N, K, fmt, dtype, device)


# Every K tile full (EVEN_K: no load is masked), K split over several programs (interpreted, on a pretend
# 4-SM device: (1, 128, 512) four ways of one tile, (3, 64, 1024) four ways of two, the scale prefetch crossing
# into the next split's tiles), and (40, 96, 256) one 64 x 128 tile whose rows past M and N are clamped.
EVEN = [(1, 128, 512), (3, 64, 1024), (40, 96, 256)]


@pytest.mark.parametrize("M,N,K", EVEN)
@pytest.mark.parametrize("fmt", ["mx", "nv", "e3m2", "e2m3"])
def test_full_k_tiles(fmt: str, M: int, N: int, K: int, device: str) -> None:
    if fmt in ("mx", "nv"):
        check_fp4(M, N, K, 32 if fmt == "mx" else 16, F16, device)
    else:
        check_fp6(M, N, K, fmt, BF16, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["mx", "nv", "e3m2", "e2m3"])
def test_decoded_weight_is_exact(fmt: str, dtype: torch.dtype, device: str) -> None:
    """``x = I`` reads ``W_hat^T`` back through the kernel: with every code and, for NVFP4, every E4M3 scale
    (subnormals included), the in-register decode equals the reference bit for bit in every activation dtype
    (E2M1 * E4M3 products are exact in float16; the MX scales here stay within float16's range)."""
    N, K = 48, 128
    gen = torch.Generator().manual_seed(7)

    def u8(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=gen, dtype=torch.uint8)

    if fmt in ("mx", "nv"):
        packed = pack_fp4(u8(16, N, K))
        if fmt == "mx":
            weight = (packed, u8(19, N, K // 32) + 118, None, 32)  # 2^-9 .. 2^9
        else:  # E4M3 codes 0 .. 0x7E (0x7F is NaN); a power-of-two global scale keeps the product order moot
            weight = (packed, u8(0x7F, N, K // 16).view(torch.float8_e4m3fn), torch.tensor([2.0**-5]), 16)
        triton_fn, reference_fn = fp4_triton, fp4_reference
    else:
        weight = (*pack_fp6(u8(64, N, K)), torch.rand(N, 1, generator=gen) + 0.5, fmt)
        triton_fn, reference_fn = fp6_triton, fp6_reference
    args = [*on(device, torch.eye(K, dtype=dtype), *weight[:-1]), weight[-1]]  # the last is block or fmt
    y, ref = triton_fn(*args, F32).cpu(), reference_fn(*args, F32).cpu()
    assert torch.equal(y, ref), f"{(y != ref).sum().item()} of {y.numel()} decoded weights differ"


def test_out_dtype_differs_from_x(device: str) -> None:
    check_fp4(5, 64, 192, 16, BF16, device, out_dtype=F32)
    check_fp6(33, 48, 160, "e3m2", F16, device, out_dtype=F32)


# SmolLM2-135M's linears (N x K): q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536.
@pytest.mark.parametrize("M,N,K,block,dtype", [
    (1, 576, 1536, 32, F16),
    (1, 1536, 576, 16, BF16),
    (1, 192, 576, 32, BF16),
    (33, 192, 576, 16, F16),
], ids=["down-mx", "up-nv", "k-mx", "k-nv-m33"])
def test_fp4_smollm2_shapes(M: int, N: int, K: int, block: int, dtype: torch.dtype, device: str) -> None:
    check_fp4(M, N, K, block, dtype, device)


@pytest.mark.parametrize("M,N,K,fmt,dtype", [
    (1, 576, 576, "e3m2", F16),
    (5, 192, 576, "e2m3", BF16),
], ids=["q-e3m2", "k-e2m3-m5"])
def test_fp6_smollm2_shapes(M: int, N: int, K: int, fmt: str, dtype: torch.dtype, device: str) -> None:
    check_fp6(M, N, K, fmt, dtype, device)


# ---- the references against a decode written from the format definitions ------------------------------

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    n = torch.arange(packed.shape[1] * 2)
    return (packed.long()[:, n // 2] >> (4 * (n % 2))) & 0xF  # [N, K], even element in the low nibble


def e2m1_by_hand(codes: torch.Tensor) -> torch.Tensor:
    return torch.where(codes >= 8, -1.0, 1.0).double() * E2M1_VALUES[codes & 7]


def fp6_by_hand(hi2: torch.Tensor, lo4: torch.Tensor, ebits: int, mbits: int, bias: int) -> torch.Tensor:
    n = torch.arange(hi2.shape[1] * 4)
    code = (((hi2.long()[:, n // 4] >> (2 * (n % 4))) & 3) << 4) | unpack_nibbles(lo4)
    E, Mf = (code >> mbits) & ((1 << ebits) - 1), (code & ((1 << mbits) - 1)).double()
    mag = torch.where(E > 0, 2.0 ** (E - bias).double() * (1 + Mf / 2**mbits), 2.0 ** (1 - bias) * Mf / 2**mbits)
    return torch.where(code >= 32, -mag, mag)


def test_fp4_references_equal_independent_decode() -> None:
    x = randn(3, 64, seed=1)
    packed, e8m0, _ = mx_weight(8, 64, seed=2)
    w = e2m1_by_hand(unpack_nibbles(packed)) * torch.exp2(e8m0.double() - 127).repeat_interleave(32, dim=1)
    torch.testing.assert_close(fp4_reference(x, packed, e8m0, None, 32, F32), (x.double() @ w.T).float())
    packed, s_b, g = nv_weight(8, 64, seed=3)
    w = e2m1_by_hand(unpack_nibbles(packed)) * s_b.double().repeat_interleave(16, dim=1) * g.double()
    torch.testing.assert_close(fp4_reference(x, packed, s_b, g, 16, F32), (x.double() @ w.T).float())


@pytest.mark.parametrize("fmt,fields", [("e3m2", (3, 2, 3)), ("e2m3", (2, 3, 1))])
def test_fp6_reference_equals_independent_decode(fmt: str, fields: tuple[int, int, int]) -> None:
    x = randn(3, 64, seed=1)
    hi2, lo4, scale = fp6_weight(8, 64, fmt, F32, seed=5)
    w = fp6_by_hand(hi2, lo4, *fields) * scale.double()
    torch.testing.assert_close(fp6_reference(x, hi2, lo4, scale, fmt, F32), (x.double() @ w.T).float())


def test_fp4_golden_bytes(device: str) -> None:
    # byte 0x21: codes 1, 2 -> 0.5, 1.0; byte 0xF7: codes 7, 15 -> 6.0, -6.0; E8M0 128 = 2.0
    packed = torch.tensor([[0x21, 0xF7] * 16], dtype=torch.uint8, device=device)  # N = 1, K = 64
    e8m0 = torch.tensor([[128, 126]], dtype=torch.uint8, device=device)  # 2.0, then 0.5
    x = torch.ones(1, 64, device=device)
    for fn in (fp4_reference, fp4_triton):  # 8 * (0.5 + 1 + 6 - 6) * (2 + 0.5) = 30
        assert fn(x, packed, e8m0, None, 32, F32).cpu().tolist() == [[30.0]]


# ---- input checks --------------------------------------------------------------------------------------

def _fp4_args(block: int) -> dict:
    packed, bs, g = (mx_weight if block == 32 else nv_weight)(16, 64, seed=9)
    x = randn(2, 64, seed=10).to(F16)
    return dict(x=x, packed=packed, block_scale=bs, global_scale=g, block=block, out_dtype=F16)


FP4_BAD: dict[str, tuple[int, Callable[[dict], None]]] = {
    "x int8": (32, lambda a: a.update(x=a["x"].to(torch.int8))),
    "packed int32": (32, lambda a: a.update(packed=a["packed"].int())),
    "packed shape": (16, lambda a: a.update(packed=a["packed"][:, :16])),
    "block 8": (32, lambda a: a.update(block=8)),
    "K not a block multiple": (16, lambda a: a.update(x=randn(2, 40, seed=1).half(), packed=a["packed"][:, :20])),
    "mx with global scale": (32, lambda a: a.update(global_scale=torch.ones(1))),
    "nv without global scale": (16, lambda a: a.update(global_scale=None)),
    "nv uint8 block scale": (16, lambda a: a.update(block_scale=a["block_scale"].view(torch.uint8))),
    "global scale shape": (16, lambda a: a.update(global_scale=torch.ones(2))),
    "x non-contiguous": (32, lambda a: a.update(x=randn(64, 2, seed=1).half().T)),
    "device mismatch": (16, lambda a: a.update(block_scale=a["block_scale"].to("meta"))),
}


@pytest.mark.parametrize("case", list(FP4_BAD))
def test_fp4_launcher_rejects_bad_input(case: str) -> None:
    block, corrupt = FP4_BAD[case]
    args = _fp4_args(block)
    corrupt(args)
    with pytest.raises(LowbitError):
        fp4_triton(**args)


def _fp6_args() -> dict:
    hi2, lo4, scale = fp6_weight(16, 64, "e3m2", F16, seed=11)
    return dict(x=randn(2, 64, seed=12).to(F16), hi2=hi2, lo4=lo4, scale=scale, fmt="e3m2", out_dtype=F16)


FP6_BAD: dict[str, Callable[[dict], None]] = {
    "unknown format": lambda a: a.update(fmt="e4m3"),
    "x float64": lambda a: a.update(x=a["x"].double()),
    "hi2 shape": lambda a: a.update(hi2=a["hi2"][:, :8]),
    "lo4 int8": lambda a: a.update(lo4=a["lo4"].to(torch.int8)),
    "scale [N]": lambda a: a.update(scale=a["scale"][:, 0]),
    "K not a multiple of 4": lambda a: a.update(x=randn(2, 62, seed=1).half()),
    "scale non-contiguous": lambda a: a.update(scale=torch.rand(32, 1, dtype=F16)[::2]),
    "device mismatch": lambda a: a.update(lo4=a["lo4"].to("meta")),
}


@pytest.mark.parametrize("case", list(FP6_BAD))
def test_fp6_launcher_rejects_bad_input(case: str) -> None:
    args = _fp6_args()
    FP6_BAD[case](args)
    with pytest.raises(LowbitError):
        fp6_triton(**args)
