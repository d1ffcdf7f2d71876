"""FP element formats: FP8 bit-exact against torch's float8 dtypes, FP6/FP4 against golden tables."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.fp import E2M1, E2M3, E3M2, E4M3, E5M2, decode_e8m0, decode_fp, e8m0_exponent, encode_fp, fp_format, round_to_fp

# Positive values of every code with the sign bit clear, in code order (from the format definitions).
GOLDEN = {
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e3m2": [0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75,
             2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28],
    "e2m3": [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
             2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5],
}


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_every_code_matches_torch(fmt, dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    ours = decode_fp(codes, fmt)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(ours[finite], ref[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(ref[finite]))  # -0 is its own code
    assert torch.equal(encode_fp(ref[finite], fmt), codes[finite])


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_rounding_matches_torch_cast(fmt, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50_000, generator=g) * fmt.max / 8, torch.randn(20_000, generator=g) * 1e-3,
                   torch.randn(5_000, generator=g) * 1e-6])
    x = x[x.abs() <= fmt.max]
    grid = decode_fp(torch.arange(128, dtype=torch.uint8), fmt)
    grid = grid[torch.isfinite(grid)].sort().values
    ties = (grid[:-1] + grid[1:]) / 2  # exact midpoints: ties go to the even code
    for v in (x, ties, -ties):
        assert torch.equal(encode_fp(v, fmt), v.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("name", ["e2m1", "e3m2", "e2m3"])
def test_small_formats_match_golden_tables(name: str) -> None:
    fmt = fp_format(name)
    golden = torch.tensor(GOLDEN[name])
    half = 1 << (fmt.bits - 1)
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    assert torch.equal(decode_fp(codes[:half], fmt), golden)
    assert torch.equal(decode_fp(codes[half:], fmt), -golden)
    assert fmt.max == float(golden[-1])
    assert torch.equal(encode_fp(golden, fmt), codes[:half])
    assert torch.equal(encode_fp(-golden[1:], fmt), codes[half + 1 :])


@pytest.mark.parametrize("name", ["e2m1", "e3m2", "e2m3"])
def test_small_formats_round_to_nearest_even_and_saturate(name: str) -> None:
    fmt = fp_format(name)
    grid = torch.tensor(GOLDEN[name])
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(20_000, generator=g) * 2 - 1) * fmt.max * 1.3
    q = round_to_fp(x, fmt)
    # nearest by brute force; at exact ties, the code with an even mantissa (even code index)
    dist = (x.abs()[:, None] - grid[None, :]).abs()
    best = dist.argmin(dim=1)
    assert torch.equal(q.abs(), grid[best])
    ties = (grid[:-1] + grid[1:]) / 2
    idx = encode_fp(ties, fmt).long()
    assert bool((idx % 2 == 0).all())
    assert torch.equal(round_to_fp(torch.tensor([1e9, -1e9, torch.inf, -torch.inf]), fmt),
                       torch.tensor([fmt.max, -fmt.max, fmt.max, -fmt.max]))
    assert torch.isnan(round_to_fp(torch.tensor([torch.nan]), fmt)).all()


def test_e8m0_round_trip() -> None:
    e = torch.arange(-127, 128)
    scale = torch.ldexp(torch.ones(e.shape), e)
    codes = e8m0_exponent(scale)
    assert torch.equal(codes.long(), e + 127)
    assert torch.equal(decode_e8m0(codes), scale)
    assert int(e8m0_exponent(torch.tensor([torch.nan]))) == 255 and torch.isnan(decode_e8m0(torch.tensor([255], dtype=torch.uint8))).all()


def test_unknown_format_lists_valid_ones() -> None:
    with pytest.raises(LowbitError, match="e4m3"):
        fp_format("e9m9")
