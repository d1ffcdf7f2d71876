"""FireQ INT4 x FP8 GEMM: Triton vs reference, and the reference vs an independent lookup-table decode.

Tolerances (docs/KERNELS.md "Tolerances"): the FP8 weight values are identical in both paths (same E4M3
rounding), only the float32 accumulation order differs, and on Hopper the FP8 MMA adds inside the tensor core
with ~14 significant bits (promoted to float32 once per K tile). Float32 outputs: ``2e-3 * max|y|`` rather than
the ``1e-4`` of float32-input GEMMs; 16-bit outputs: ``1e-2 * max|y|``. A wrong nibble, group or scale gives
errors of order ``max|y|``. The reference vs the lookup-table oracle: both products are exact in float64, so
``rtol = 1e-6`` (float32 epilogue rounding).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_codes
from lowbit.kernels.int4_fp8 import fireq_fp8_weight, int4_fp8_reference, int4_fp8_triton

FP8 = torch.float8_e4m3fn
# M x N x K, group: SmolLM2-135M's real N x K (group 128 does not divide 576, so 64), ragged M/N/K, and a
# prefill-size M (> 64: the large-M tile, BLOCK_K = 64); then channel-wise scales (group 384 > BLOCK_K = 128:
# three K tiles per group), group 40 (no K tile of >= 32 inside it: per-word scale loads) and 16-column groups.
SHAPES = [
    (1, 576, 1536, 128), (1, 1536, 576, 64), (5, 192, 576, 64), (33, 100, 192, 32), (70, 48, 128, 32),
    (3, 64, 384, 384), (2, 48, 320, 40), (70, 32, 128, 16),
]


def _case(m: int, n: int, k: int, group: int, seed: int, device: str):  # type: ignore[no-untyped-def]
    """Random FireQ tensors: ``(q int8 [n, k], [xq, xs, packed, scale, global_scale] on device)``.

    Group scales are E4M3 values from 2^-9 (subnormal) to 2^7, so ``q * s`` exercises E4M3 rounding (up to 6
    significant bits in, 4 out), subnormal results and saturation at 448 (e.g. -8 * 64).
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.exp2(torch.rand(n, k // group, generator=g) * 16 - 9).to(FP8)
    mag = torch.exp2(torch.rand(m, k, generator=g) * 12 - 6)
    xq = torch.where(torch.rand(m, k, generator=g) < 0.5, -mag, mag).to(FP8)
    xs = (torch.rand(m, 1, generator=g) + 0.5) * 1e-3
    global_scale = torch.tensor([0.125])  # FireQ's 1 / p for a power-of-two pre-scale p = 8
    args = [t.to(device) for t in (xq, xs, pack_codes(q, 4), scale, global_scale)]
    return q, args


def _assert_scaled_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = rel * ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_fp8_matches_reference(shape: tuple[int, int, int, int], device: str) -> None:
    m, n, k, group = shape
    _, args = _case(m, n, k, group, seed=m + n + k, device=device)
    y = int4_fp8_triton(*args, group, torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _assert_scaled_close(y, int4_fp8_reference(*args, group, torch.float32), 2e-3)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_int4_fp8_out_dtypes(out_dtype: torch.dtype, device: str) -> None:
    _, args = _case(33, 100, 192, 32, seed=1, device=device)
    y = int4_fp8_triton(*args, 32, out_dtype)
    assert y.dtype == out_dtype
    _assert_scaled_close(y, int4_fp8_reference(*args, 32, out_dtype), 1e-2 if out_dtype != torch.float32 else 2e-3)


def test_reference_is_the_lookup_table_product() -> None:
    k, group = 256, 64
    q, (xq, xs, packed, scale, gs) = _case(6, 40, k, group, seed=2, device="cpu")
    # FireQ's LUT: per group, the 16 FP8 values e4m3(c * s) for c = -8..7, rounded by torch's own saturating
    # cast (independent of formats.fp.round_to_fp), indexed by the code (from q directly, not unpack_codes).
    codes = torch.arange(-8, 8, dtype=torch.float32)
    lut = (codes * scale.float()[..., None]).clamp(-448, 448).to(FP8).float()  # [N, G, 16]
    idx = (q.long() + 8).reshape(40, k // group, group)  # [N, G, g]
    w = torch.gather(lut, 2, idx).reshape(40, k)
    expected = (xq.double() @ w.double().t()) * xs.double() * gs.double()
    y = int4_fp8_reference(xq, xs, packed, scale, gs, group, torch.float32)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    assert torch.equal(fireq_fp8_weight(packed, scale, k), w)


def test_product_is_rounded_to_e4m3(device: str) -> None:
    # ALGORITHMS.md 8.3: s = 1.125, q = 7 -> 7.875 is not an E4M3 value and the LUT holds 8.0; q = -8 with
    # s = 64 saturates at -448. xq is one-hot in column 0 so y reads the decoded weights of column 0.
    n, k = 16, 32
    q = torch.zeros(n, k, dtype=torch.int8)
    q[:, 0] = torch.tensor([7, -8, 3, 1] * 4, dtype=torch.int8)
    scale = torch.tensor([1.125, 64.0, 0.625, 2.0**-9] * 4).reshape(n, 1).to(FP8)
    xq = torch.zeros(1, k)
    xq[0, 0] = 1.0
    xq = xq.to(FP8)
    args = [t.to(device) for t in (xq, torch.ones(1, 1), pack_codes(q, 4), scale, torch.ones(1))]
    expected = torch.tensor([8.0, -448.0, 1.875, 2.0**-9] * 4)  # 3 * 0.625 = 1.875 is exact
    assert torch.equal(int4_fp8_reference(*args, k, torch.float32).cpu()[0], expected)
    assert torch.equal(int4_fp8_triton(*args, k, torch.float32).cpu()[0], expected)


def test_int4_fp8_rejects_bad_input(device: str) -> None:
    _, (xq, xs, packed, scale, gs) = _case(4, 16, 128, 32, seed=5, device=device)
    f32 = torch.float32
    bad_calls = [
        lambda: int4_fp8_triton(xq.float(), xs, packed, scale, gs, 32, f32),  # activation dtype
        lambda: int4_fp8_triton(xq, xs, packed, scale, gs, 48, f32),  # group does not divide K
        lambda: int4_fp8_triton(xq[:, :100].contiguous(), xs, packed, scale, gs, 4, f32),  # K % 8
        lambda: int4_fp8_triton(xq, xs, packed[:, :8].contiguous(), scale, gs, 32, f32),  # packed shape
        lambda: int4_fp8_triton(xq, xs, packed, scale.float(), gs, 32, f32),  # scale dtype
        lambda: int4_fp8_triton(xq, xs, packed, scale[:, :2].contiguous(), gs, 32, f32),  # scale shape
        lambda: int4_fp8_triton(xq, xs, packed, scale, gs.reshape(1, 1), 32, f32),  # global shape
        lambda: int4_fp8_triton(xq, xs, packed, scale, gs.double(), 32, f32),  # global dtype
        lambda: int4_fp8_triton(xq, xs.half(), packed, scale, gs, 32, f32),  # xs dtype
        lambda: int4_fp8_triton(xq, xs, packed, scale.t().contiguous().t(), gs, 32, f32),  # non-contiguous
        lambda: int4_fp8_triton(xq, xs, packed, scale.to("meta"), gs, 32, f32),  # device mismatch
        lambda: int4_fp8_triton(xq, xs, packed, scale, gs, 32, torch.float64),  # out dtype
    ]
    for call in bad_calls:
        with pytest.raises(LowbitError):
            call()
