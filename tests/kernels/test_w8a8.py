"""W8A8 kernels: per-token INT8/FP8 activation quantization and the scaled INT8/FP8 GEMM, Triton vs reference.

Tolerances (docs/KERNELS.md "Tolerances"):

* activation quantization: bit-exact codes and scales (same float32 operations, IEEE division, ties to even);
* INT8 GEMM: the int32 accumulator is exact and the epilogue is the same float32 products in the same order, so
  float32 outputs are compared bit for bit; 16-bit outputs use the documented ``1e-2 * max|y|`` bound;
* FP8 GEMM: float32 accumulation in another order. On Hopper the FP8 MMA adds inside the tensor core with ~14
  significant bits (the kernel promotes to float32 once per K tile), so float32 outputs get ``2e-3 * max|y|``
  rather than the ``1e-4`` of float32-input GEMMs; 16-bit outputs ``1e-2 * max|y|``. A wrong index or scale
  gives errors of order ``max|y|``.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.int import quantize_activation_per_token
from lowbit.kernels.w8a8 import (
    FP8,
    quantize_per_token_fp8_reference,
    quantize_per_token_fp8_triton,
    quantize_per_token_int8_reference,
    quantize_per_token_int8_triton,
    scaled_mm_reference,
    scaled_mm_triton,
)

ACT_SHAPES = [(1, 576), (5, 1536), (9, 192)]  # M x K: M=1, a real width, K not a power of two (one program a row)
# M x N x K: SmolLM2-135M's real N x K at decode size, ragged M/N/K (K=192 is 1.5 K tiles), a prefill-size M.
GEMM_SHAPES = [(1, 576, 1536), (1, 1536, 576), (5, 192, 576), (33, 100, 192), (70, 48, 64)]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform over the full int8 range, -128 included."""
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


def _fp8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """FP8 values over most of the E4M3 range (normals, subnormals and +-448)."""
    mag = torch.exp2(torch.rand(shape, generator=g) * 17 - 9)  # 2^-9 .. 2^8
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (sign * mag).clamp(-448, 448).to(FP8)


def _scales(n: int, g: torch.Generator, magnitude: float) -> torch.Tensor:
    return (torch.rand(n, 1, generator=g) + 0.5) * magnitude  # float32 [n, 1], positive


def _assert_scaled_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """``|y - ref| <= rel * max|ref|`` elementwise (atol = rtol = rel * max|ref|, KERNELS.md)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = rel * ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=0)


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with per-row magnitudes over four decades, an outlier channel and one tiny row."""
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.rand(m, 1, generator=g) * 12 - 6)
    x[:, k // 3] *= 20  # outlier channel, as in real LLM activations
    x[-1] *= 1e-6
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------------------
# Activation quantization
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int8_activation_quant_bit_exact(shape: tuple[int, int], dtype: torch.dtype, device: str) -> None:
    x = _activations(*shape, dtype, seed=shape[0] + shape[1]).to(device)
    q, s = quantize_per_token_int8_triton(x)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0], 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    formats_q, formats_s = quantize_activation_per_token(x.cpu())  # the reference is the formats primitive
    assert torch.equal(q_ref.cpu(), formats_q) and torch.equal(s_ref.cpu(), formats_s)
    live = s_ref.flatten() > 1e-8
    assert (q[live].int().abs().amax(-1) >= 127).all()  # the absmax maps to +-127.5, i.e. 127 or -128 after the clamp


def test_int8_activation_quant_ties_and_zero_row(device: str) -> None:
    # absmax 127.5 gives s = 1 exactly, so x/s lands on exact .5 ties; a zero row takes the 1e-8 floor.
    ties = torch.tensor([127.5, -127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.4999998, -3.5000002])
    row = torch.cat([ties, torch.linspace(-100, 100, 52)])
    x = torch.stack([row, torch.zeros_like(row), -row * 3]).to(device)
    q, s = quantize_per_token_int8_triton(x)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[0, :12].tolist() == [127, -128, 0, 2, 2, 0, -2, -2, 126, -126, 3, -4]
    assert float(s[1]) == pytest.approx(1e-8) and not q[1].any()


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fp8_activation_quant_bit_exact(shape: tuple[int, int], dtype: torch.dtype, device: str) -> None:
    x = _activations(*shape, dtype, seed=7 * shape[0] + shape[1]).to(device)
    q, s = quantize_per_token_fp8_triton(x)
    q_ref, s_ref = quantize_per_token_fp8_reference(x)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (shape[0], 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # codes, so -0 and +0 differ
    # Independent oracle: torch's own saturating RNE cast after clamping.
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True)
    # an elementwise division: torch on CUDA would multiply by the reciprocal of a Python-scalar divisor
    s_ind = (absmax / torch.full_like(absmax, 448.0)).clamp_min(1e-12)
    q_ind = (xf / s_ind).clamp(-448, 448).to(FP8)
    assert torch.equal(s_ref, s_ind) and torch.equal(q_ref.view(torch.uint8), q_ind.view(torch.uint8))


def test_fp8_activation_quant_every_rounding_case(device: str) -> None:
    # A row with absmax 448 has s = 1, so the kernel rounds x itself: every E4M3 value, the midpoints between
    # neighbours (ties to even), a float32 ulp either side of each midpoint, and values past the last binade.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()  # 0 .. 448, all finite magnitudes
    mid = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1), torch.tensor([447.9])])
    x = torch.cat([row, -row, torch.tensor([-1e-30, 1e-30])]).reshape(1, -1).to(device)
    q, s = quantize_per_token_fp8_triton(x)
    q_ref, s_ref = quantize_per_token_fp8_reference(x)
    assert float(s) == 1.0 and float(s_ref) == 1.0
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(q_ref.view(torch.uint8), x.clamp(-448, 448).to(FP8).view(torch.uint8))


@pytest.mark.parametrize("fn", [quantize_per_token_int8_triton, quantize_per_token_fp8_triton], ids=["int8", "fp8"])
def test_activation_quant_rejects_bad_input(fn, device: str) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(4, 64, generator=_gen(0)).to(device)
    with pytest.raises(LowbitError):
        fn(x.to(torch.int8))
    with pytest.raises(LowbitError):
        fn(x.t())  # non-contiguous
    with pytest.raises(LowbitError):
        fn(x.reshape(2, 2, 64))  # 3-D


# ------------------------------------------------------------------------------------------------------------
# Scaled GEMM
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_scaled_mm_int8_exact(shape: tuple[int, int, int], device: str) -> None:
    m, n, k = shape
    g = _gen(m * 7 + n + k)
    xq, w = _int8((m, k), g), _int8((n, k), g)
    xq[0, :] = -128  # largest possible |sum|: K * 2^14 (> 2^24 for K = 1536, so float32 would not be exact)
    w[0, :] = -128
    # Power-of-two scales, different per row and column: the epilogue is exact and invertible, so dividing
    # them out recovers float32(accumulator), checked against an int64 product computed on the CPU.
    xs = torch.exp2(torch.randint(-12, -4, (m, 1), generator=g).float())
    ws = torch.exp2(torch.randint(-12, -4, (n, 1), generator=g).float())
    xq, w, xs, ws = (t.to(device) for t in (xq, w, xs, ws))
    y = scaled_mm_triton(xq, xs, w, ws, torch.float32)
    assert torch.equal(y, scaled_mm_reference(xq, xs, w, ws, torch.float32))
    exact = (xq.cpu().long() @ w.cpu().long().t()).float()
    assert torch.equal((y / xs / ws.t()).cpu(), exact)


@pytest.mark.parametrize("shape", GEMM_SHAPES[1:], ids=str)
def test_scaled_mm_fp8(shape: tuple[int, int, int], device: str) -> None:
    m, n, k = shape
    g = _gen(m + n * 3 + k)
    xq, w = _fp8((m, k), g), _fp8((n, k), g)
    xs, ws = _scales(m, g, 1e-3), _scales(n, g, 1e-3)
    xq, w, xs, ws = (t.to(device) for t in (xq, w, xs, ws))
    y = scaled_mm_triton(xq, xs, w, ws, torch.float32)
    _assert_scaled_close(y, scaled_mm_reference(xq, xs, w, ws, torch.float32), 2e-3)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_scaled_mm_out_dtypes(out_dtype: torch.dtype, kind: str, device: str) -> None:
    m, n, k = 33, 100, 192
    g = _gen(3)
    make = _int8 if kind == "int8" else _fp8
    xq, w = make((m, k), g), make((n, k), g)
    xs, ws = _scales(m, g, 1e-3), _scales(n, g, 1e-3)
    xq, w, xs, ws = (t.to(device) for t in (xq, w, xs, ws))
    y = scaled_mm_triton(xq, xs, w, ws, out_dtype)
    ref = scaled_mm_reference(xq, xs, w, ws, out_dtype)
    if kind == "int8" and out_dtype == torch.float32:
        assert torch.equal(y, ref)
    else:
        _assert_scaled_close(y, ref, 1e-2 if out_dtype != torch.float32 else 2e-3)


def test_scaled_mm_reference_is_the_dequantized_product() -> None:
    g = _gen(11)
    for make in (_int8, _fp8):
        xq, w = make((6, 96), g), make((40, 96), g)
        xs, ws = _scales(6, g, 0.1), _scales(40, g, 0.1)
        y = scaled_mm_reference(xq, xs, w, ws, torch.float32)
        expected = (xq.double() * xs.double()) @ (w.double() * ws.double()).t()
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_scaled_mm_rejects_bad_input(device: str) -> None:
    g = _gen(5)
    xq, w = _int8((4, 64), g).to(device), _int8((8, 64), g).to(device)
    xs, ws = torch.ones(4, 1, device=device), torch.ones(8, 1, device=device)
    bad_calls = [
        lambda: scaled_mm_triton(xq.float(), xs, w, ws, torch.float32),  # float activations
        lambda: scaled_mm_triton(xq, xs, w.float().to(FP8), ws, torch.float32),  # mixed int8 / fp8
        lambda: scaled_mm_triton(xq, xs, w[:, :32].contiguous(), ws, torch.float32),  # K mismatch
        lambda: scaled_mm_triton(xq, xs.reshape(1, 4), w, ws, torch.float32),  # scale shape
        lambda: scaled_mm_triton(xq, xs.half(), w, ws, torch.float32),  # scale dtype
        lambda: scaled_mm_triton(xq, xs, w.t().contiguous().t(), ws, torch.float32),  # non-contiguous
        lambda: scaled_mm_triton(xq, xs, w.to("meta"), ws, torch.float32),  # device mismatch
        lambda: scaled_mm_triton(xq, xs, w, ws, torch.int32),  # out dtype
        lambda: scaled_mm_triton(xq[0], xs, w, ws, torch.float32),  # 1-D
    ]
    for call in bad_calls:
        with pytest.raises(LowbitError):
            call()
