"""Block-scaled FP4 (MX, NV), row-scaled FP6/FP8, and FP4/FP6 packing."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.blockfp import (
    dequantize_mxfp4,
    dequantize_nvfp4,
    pack_fp4,
    pack_fp6,
    quantize_fp_rows,
    quantize_mxfp4,
    quantize_nvfp4,
    unpack_fp4,
    unpack_fp6,
)
from lowbit.formats.fp import E2M1, E3M2, E4M3, decode_e8m0, decode_fp, round_to_fp


def _w(out_f: int = 24, in_f: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g) * 0.1


def test_mxfp4_scale_is_the_floor_rule_and_values_are_nearest() -> None:
    W = _w()
    W[0, :32] = 0.0  # an all-zero block
    codes, scale_codes = quantize_mxfp4(W)
    assert codes.shape == W.shape and scale_codes.shape == (24, 3)
    scale = decode_e8m0(scale_codes)  # [out, 3]
    amax = W.reshape(24, 3, 32).abs().amax(-1)
    nz = amax > 0
    assert torch.equal(torch.log2(scale[nz]), torch.floor(torch.log2(amax[nz])) - 2)
    assert float(scale[0, 0]) == 2.0**-127
    W_hat = dequantize_mxfp4(codes, scale_codes)
    expected = round_to_fp(W.reshape(24, 3, 32) / scale[..., None], E2M1) * scale[..., None]
    assert torch.equal(W_hat, expected.reshape(W.shape))
    assert torch.equal(W_hat[0, :32], torch.zeros(32))
    # the floor rule can clip the block maximum (up to 8 * 2^e > 6 * 2^e), never by more than 1/4 of it
    assert bool(((W - W_hat).abs() <= 0.25 * amax.repeat_interleave(32, dim=1) + 1e-12).all())


def test_nvfp4_two_level_scales() -> None:
    W = _w(seed=1)
    codes, s_codes, g = quantize_nvfp4(W)
    assert s_codes.shape == (24, 6) and g.shape == ()
    assert float(g) == pytest.approx(float(W.abs().max()) / (448 * 6))
    s_b = decode_fp(s_codes, E4M3)
    assert bool((s_b > 0).all()) and bool((s_b <= 448).all())
    W_hat = dequantize_nvfp4(codes, s_codes, g)
    expected = round_to_fp(W.reshape(24, 6, 16) / (g * s_b)[..., None], E2M1) * (g * s_b)[..., None]
    assert torch.equal(W_hat, expected.reshape(W.shape))
    rel = (W - W_hat).norm() / W.norm()
    assert 0.0 < rel < 0.15  # FP4 with 16-element blocks: about 9-10 % relative error on Gaussian weights


def test_fp6_rows() -> None:
    W = _w(seed=2)
    codes, s = quantize_fp_rows(W, E3M2, torch.float16)
    assert torch.equal(s, s.half().float())
    W_hat = decode_fp(codes, E3M2) * s
    assert torch.equal(W_hat, round_to_fp(W / s, E3M2) * s)
    # 2 mantissa bits: a relative rounding error of at most 1/8 per value, about 1/8/sqrt(3) = 0.072 rms at worst
    assert 0.0 < (W - W_hat).norm() / W.norm() < 0.075


@pytest.mark.parametrize("bad", ["mx", "nv"])
def test_block_must_divide_in_features(bad: str) -> None:
    with pytest.raises(LowbitError, match="multiple"):
        (quantize_mxfp4 if bad == "mx" else quantize_nvfp4)(torch.randn(4, 40))


def test_fp4_and_fp6_packing_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    c4 = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    p4 = pack_fp4(c4)
    assert p4.shape == (5, 32) and p4.dtype == torch.uint8
    assert int(p4[0, 0]) == int(c4[0, 0]) | (int(c4[0, 1]) << 4)  # even element in the low nibble
    assert torch.equal(unpack_fp4(p4), c4)
    c6 = torch.randint(0, 64, (5, 64), generator=g, dtype=torch.uint8)
    hi2, lo4 = pack_fp6(c6)
    assert hi2.shape == (5, 16) and lo4.shape == (5, 32)
    assert int(hi2[1, 0]) == sum(((int(c6[1, j]) >> 4) & 3) << (2 * j) for j in range(4))
    assert torch.equal(unpack_fp6(hi2, lo4), c6)
    with pytest.raises(LowbitError):
        pack_fp6(c6[:, :6])
