"""DGQ A8W4 GEMM: Triton vs reference, and the reference vs the float64 product of the dequantized weight.

Tolerances (docs/KERNELS.md "Tolerances"): ``w8 = (q - z) * m`` is an integer, the int32 accumulator is exact
and the float32 epilogue is the same products in the same order, so float32 outputs must match bit for bit;
16-bit outputs get the documented ``1e-2 * max|y|`` (they are one rounding of identical float32 values, so in
practice they match exactly too). The reference vs the float64 product differs only by the float32 rounding
of the epilogue: ``rtol = 1e-6``.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_codes
from lowbit.kernels.a8w4 import a8w4_reference, a8w4_triton

# (M, N, K, group), asymmetric: SmolLM2-135M's real N x K (576 = 4.5 K tiles of 128; group 128 does not divide
# 576, so 64), ragged M and N, K = 192 with group 32 (1.5 K tiles, six groups) and a prefill-size M.
# The big shapes run once each, to keep the interpreted run short.
CASES = [
    ((1, 576, 1536, 128), False),
    ((1, 1536, 576, 64), True),
    ((5, 192, 576, 64), False),
    ((5, 192, 576, 64), True),
    ((33, 100, 192, 32), False),
    ((33, 100, 192, 32), True),
    ((70, 48, 128, 32), True),  # M > 64: the large-M tile (BLOCK_K = 64)
    ((3, 64, 512, 256), True),  # group > BLOCK_K (128): two K tiles per group
    ((2, 48, 320, 40), True),  # group 40 has no K tile of >= 32 inside it: per-word group loads, ragged K
    ((70, 32, 128, 16), False),  # 16-column groups, four per K tile
]


def _dgq_weight(
    n: int, k: int, group: int, asym: bool, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A random DGQ weight as the quantizer writes it: ``(q int8 [n, k], m, zero or None, s8)``.

    Multipliers span 1..127 and codes are clipped so that ``(q - z) * m`` stays in [-127, 127], as DGQ's search
    does (``lim = floor(127 / m)``); the first group of row 0 is forced onto both ends of the INT8 range.
    """
    groups = k // group
    m = torch.exp2(torch.rand(n, groups, generator=g) * 7).floor().to(torch.int8)  # 1 .. 127, log-uniform
    zero = torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8) if asym else None
    m[0, 0] = 127
    if zero is not None:
        zero[0, 0] = 0
    z = torch.zeros(n, groups, dtype=torch.int32) if zero is None else zero.int()
    lim = 127 // m.int()
    lo = torch.clamp(z - lim, min=-8).repeat_interleave(group, 1)
    hi = torch.clamp(z + lim, max=7).repeat_interleave(group, 1)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int32)
    q = torch.minimum(torch.maximum(q, lo), hi)
    q[0, 0], q[0, 1] = 1, -1  # m = 127, z = 0: w8 = +127 and -127
    s8 = (torch.rand(n, 1, generator=g) + 0.5) * 1e-3
    return q.to(torch.int8), m, zero, s8


def _case(m: int, n: int, k: int, group: int, asym: bool, seed: int, device: str):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q, mult, zero, s8 = _dgq_weight(n, k, group, asym, g)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)  # full int8 range
    xq[0, :] = -128  # with w8 = +-127 the largest |sum|, K 128 127 (> 2^24 for K = 1536)
    xs = (torch.rand(m, 1, generator=g) + 0.5) * 1e-2
    packed = pack_codes(q, 4)
    dev = [t.to(device) if t is not None else None for t in (xq, xs, packed, mult, zero, s8)]
    return q, dev


@pytest.mark.parametrize(("shape", "asym"), CASES, ids=[f"{s}-{'asym' if a else 'sym'}" for s, a in CASES])
def test_a8w4_matches_reference_exactly(shape: tuple[int, int, int, int], asym: bool, device: str) -> None:
    m, n, k, group = shape
    _, args = _case(m, n, k, group, asym, seed=m + n + k + asym, device=device)
    y = a8w4_triton(*args, group, torch.float32)
    ref = a8w4_reference(*args, group, torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.equal(y, ref)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_a8w4_out_dtypes(out_dtype: torch.dtype, device: str) -> None:
    _, args = _case(33, 100, 192, 32, True, seed=1, device=device)
    y = a8w4_triton(*args, 32, out_dtype)
    ref = a8w4_reference(*args, 32, out_dtype)
    assert y.dtype == out_dtype
    tol = 1e-2 * ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_reference_is_the_dequantized_product(asym: bool) -> None:
    k, group = 256, 64
    q, (xq, xs, packed, mult, zero, s8) = _case(7, 24, k, group, asym, seed=3, device="cpu")
    z = torch.zeros_like(mult, dtype=torch.float64) if zero is None else zero.double()
    # Dequantized from the unpacked codes directly (no unpack_codes): s8 * m * (q - z), all in float64.
    w_hat = s8.double() * mult.double().repeat_interleave(group, 1) * (q.double() - z.repeat_interleave(group, 1))
    expected = (xq.double() * xs.double()) @ w_hat.t()
    y = a8w4_reference(xq, xs, packed, mult, zero, s8, group, torch.float32)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_reference_rejects_products_outside_int8() -> None:
    _, (xq, xs, packed, mult, zero, s8) = _case(2, 8, 64, 32, False, seed=4, device="cpu")
    mult = mult.clone()
    mult[0, 0] = 127
    packed = pack_codes(torch.full((8, 64), 2, dtype=torch.int8), 4)  # q = 2: 2 * 127 = 254
    with pytest.raises(LowbitError, match="INT8 range"):
        a8w4_reference(xq, xs, packed, mult, zero, s8, 32, torch.float32)


def test_a8w4_rejects_bad_input(device: str) -> None:
    _, (xq, xs, packed, mult, zero, s8) = _case(4, 16, 128, 32, True, seed=5, device=device)
    f32 = torch.float32
    bad_calls = [
        lambda: a8w4_triton(xq.float(), xs, packed, mult, zero, s8, 32, f32),  # activation dtype
        lambda: a8w4_triton(xq, xs, packed, mult, zero, s8, 48, f32),  # group does not divide K
        lambda: a8w4_triton(xq, xs, packed, mult, zero, s8, 0, f32),
        lambda: a8w4_triton(xq[:, :100].contiguous(), xs, packed, mult, zero, s8, 4, f32),  # K % 8
        lambda: a8w4_triton(xq, xs, packed[:, :8].contiguous(), mult, zero, s8, 32, f32),  # packed shape
        lambda: a8w4_triton(xq, xs, packed.to(torch.int64), mult, zero, s8, 32, f32),  # packed dtype
        lambda: a8w4_triton(xq, xs, packed, mult.float(), zero, s8, 32, f32),  # multiplier dtype
        lambda: a8w4_triton(xq, xs, packed, mult, zero[:, :2].contiguous(), s8, 32, f32),  # zero shape
        lambda: a8w4_triton(xq, xs, packed, mult, zero, s8.half(), 32, f32),  # s8 dtype
        lambda: a8w4_triton(xq, xs.reshape(1, 4), packed, mult, zero, s8, 32, f32),  # xs shape
        lambda: a8w4_triton(xq, xs, packed, mult.t().contiguous().t(), zero, s8, 32, f32),  # non-contiguous
        lambda: a8w4_triton(xq, xs, packed.to("meta"), mult, zero, s8, 32, f32),  # device mismatch
        lambda: a8w4_triton(xq, xs, packed, mult, zero, s8, 32, torch.int8),  # out dtype
    ]
    for call in bad_calls:
        with pytest.raises(LowbitError):
            call()
