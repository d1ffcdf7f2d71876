"""Integer grids: golden vectors, the half-step error bound, and the group fallback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats.int import (
    compute_qparams,
    dequantize_codes,
    fake_quantize,
    quantize_activation_per_token,
    quantize_codes,
)
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme, resolve_group_size

F16_SCALES = Precision(torch.float32, torch.float16)  # a float32 model with float16 scales


def test_symmetric_golden() -> None:
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0], [-2.0, 1.1, 0.5, 0.26]])
    s = WeightScheme(bits=4, strategy="channel", group_size=None)
    scale, zero = compute_qparams(w, s)
    assert zero is None
    torch.testing.assert_close(scale, torch.tensor([[0.1], [2.0 / 7]]))
    codes = quantize_codes(w, scale, zero, s)
    # 0.26 / (2/7) = 0.91 -> 1 ; 0.5 / (2/7) = 1.75 -> 2 ; -0.35/0.1 = -3.5 -> -4 (half to even)
    assert codes.tolist() == [[7, -4, 1, 0], [-7, 4, 2, 1]]
    assert codes.dtype == torch.int8


def test_asymmetric_golden() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.5]])  # all positive: the range is widened to contain 0
    s = WeightScheme(bits=2, strategy="channel", group_size=None, symmetric=False)
    scale, zero = compute_qparams(w, s)
    torch.testing.assert_close(scale, torch.tensor([[1.5]]))
    assert zero.tolist() == [[-2]]  # round(qmin - 0/1.5) = -2
    codes = quantize_codes(w, scale, zero, s)
    assert codes.tolist() == [[-1, -1, 0, 1]]  # round(w/1.5) - 2 = [1, 1, 2, 3] - 2
    torch.testing.assert_close(dequantize_codes(codes, scale, zero), torch.tensor([[1.5, 1.5, 3.0, 4.5]]))


def test_group_scales_are_per_group() -> None:
    w = torch.cat([torch.full((1, 4), 1.0), torch.full((1, 4), 7.0)], dim=1)
    s = WeightScheme(bits=4, strategy="group", group_size=4)
    scale, _ = compute_qparams(w, s)
    torch.testing.assert_close(scale, torch.tensor([[1.0 / 7, 1.0]]))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    sym=st.booleans(),
    group=st.sampled_from([None, 8, 16]),
    seed=st.integers(0, 10_000),
)
def test_dequantize_error_at_most_half_step(bits: int, sym: bool, group: int | None, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 32, generator=gen) * torch.rand(6, 1, generator=gen) * 3
    s = WeightScheme(bits=bits, strategy="group" if group else "channel", group_size=group, symmetric=sym)
    scale, zero = compute_qparams(w, s)
    w_hat = dequantize_codes(quantize_codes(w, scale, zero, s), scale, zero)
    step = scale.repeat_interleave(32 // scale.shape[1], dim=1)
    assert ((w - w_hat).abs() <= step / 2 + 1e-6).all()


def test_scale_dtype_rounding_is_shared_by_simulation_and_codes() -> None:
    """Scales are rounded to their storage dtype; the dequantized weight is the exact product, rounded once to the
    model dtype (formats/precision.py): exact in float32 with 16-bit scales, rounded for a bfloat16 model."""
    w = torch.randn(8, 64, dtype=torch.float32)
    s = WeightScheme(bits=4, strategy="group", group_size=32, symmetric=False)
    scale, zero = compute_qparams(w, s, torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # representable in bf16
    codes = quantize_codes(w, scale, zero, s)
    exact = ((codes.double() - zero.double().repeat_interleave(32, dim=1)) * scale.double().repeat_interleave(32, dim=1))
    expected = dequantize_codes(codes, scale, zero, torch.float32)
    assert torch.equal(expected.double(), exact)  # a float32 model: the exact products
    assert torch.equal(fake_quantize(w, s, torch.bfloat16), expected)
    assert not torch.equal(expected, expected.to(torch.bfloat16).float())  # (not rounded to the scale dtype)
    bf16 = dequantize_codes(codes, scale, zero, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, exact.to(torch.bfloat16))
    w16 = w.to(torch.bfloat16)
    scale16, zero16 = compute_qparams(w16, s, torch.bfloat16)
    assert torch.equal(fake_quantize(w16, s, torch.bfloat16),
                       dequantize_codes(quantize_codes(w16, scale16, zero16, s), scale16, zero16, torch.bfloat16))


def test_zero_group_does_not_divide_by_zero() -> None:
    w = torch.zeros(2, 8)
    out = fake_quantize(w, WeightScheme(bits=4, strategy="channel", group_size=None))
    assert torch.equal(out, w)


@pytest.mark.parametrize(
    ("in_features", "group", "expected"),
    [(576, 128, 64), (1536, 128, 128), (172, 128, 172), (64, 128, 64), (96, 64, 32), (576, 64, 64)],
)
def test_group_fallback(in_features: int, group: int, expected: int) -> None:
    assert resolve_group_size(in_features, group) == expected


def test_for_layer_makes_fallback_explicit() -> None:
    s = WeightScheme(bits=4, strategy="group", group_size=128)
    assert s.for_layer(1536) == s
    assert s.for_layer(576) == WeightScheme(bits=4, strategy="group", group_size=64)
    assert s.for_layer(172).strategy == "channel"


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 1}, {"bits": 9}, {"strategy": "row"}, {"format": "nf4"}, {"strategy": "group", "group_size": 0},
     {"strategy": "channel", "group_size": 128}],
)
def test_bad_scheme_is_a_clear_error(kwargs: dict) -> None:
    with pytest.raises(LowbitError):
        WeightScheme(**kwargs)


def test_activation_per_token_golden() -> None:
    x = torch.tensor([[0.0, 1.275, -2.55], [0.5, 0.25, 0.0]])
    q, s = quantize_activation_per_token(x)
    torch.testing.assert_close(s, torch.tensor([[0.02], [0.5 / 127.5]]))
    assert q.tolist() == [[0, 64, -128], [127, 64, 0]]  # 63.75->64, -127.5->-128, 127.5->128->127


@pytest.mark.parametrize(
    ("ins", "group", "expected"),
    [([576, 1536], 128, 64), ([4096, 11008], 128, 128), ([64, 172], 128, None), ([96, 192], 96, 96), ([576, 1536], 32, 32)],
)
def test_model_group_size(ins: list[int], group: int, expected: int | None) -> None:
    from lowbit.formats.scheme import model_group_size

    assert model_group_size(ins, group) == expected


def test_for_model_then_for_layer() -> None:
    s = WeightScheme(bits=4, strategy="group", group_size=128)
    m = s.for_model([576, 1536])
    assert m.group_size == 64 and m.for_layer(1536) == m and m.for_layer(576) == m
    assert s.for_model([64, 172]) == s  # no shared size: each layer falls back on its own


@pytest.mark.parametrize(
    "scheme",
    [
        WeightScheme(bits=4, strategy="group", group_size=32),
        WeightScheme(bits=3, strategy="group", group_size=64, symmetric=False),
        WeightScheme(bits=2, strategy="channel", group_size=None, symmetric=False),
        WeightScheme(bits=8, strategy="tensor", group_size=None),
    ],
    ids=lambda s: f"{s.bits}b-{s.strategy}-{'sym' if s.symmetric else 'asym'}",
)
@pytest.mark.parametrize("precision", [Precision(torch.float32, torch.float16), Precision(torch.float16, torch.float16),
                                       Precision()], ids=str)
def test_mse_clip_matches_the_shared_primitives(scheme: WeightScheme, precision: Precision) -> None:
    """The search's own arithmetic equals compute_qparams / quantize_codes / dequantize_codes per candidate."""
    from lowbit.formats.int import abs_power_, compute_qparams, dequantize_codes, mse_clip, quantize_codes

    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 256, generator=g) * torch.rand(300, 1, generator=g)  # 76800 weights: threaded path
    w[5] = 0.0
    best_err, best_p = None, None
    for i in range(80):
        p = 1.0 - i / 100
        scale, zero = compute_qparams(w, scheme, precision.scale_dtype, clip=p)
        err = dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero, precision.dtype).float() - w
        err = abs_power_(err, 2.4).reshape(scale.shape[0], scale.shape[1], -1).sum(-1)
        if best_err is None:
            best_err, best_p = err, torch.full_like(err, p)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    assert torch.equal(mse_clip(w, scheme, precision), best_p)


def test_abs_power_is_pow_within_round_off() -> None:
    from lowbit.formats.int import abs_power_

    g = torch.Generator().manual_seed(3)
    e = torch.randn(10000, generator=g) * torch.logspace(-8, 2, 10000)
    e[:3] = torch.tensor([0.0, -0.0, 1.0])
    expected = e.double().abs().pow(2.4)
    got = abs_power_(e.clone(), 2.4)
    assert got.dtype == torch.float32 and got[0] == 0 and got[1] == 0 and got[2] == 1
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.0)
    assert torch.equal(abs_power_(e.clone(), 2.0), e.abs().square())
    special = abs_power_(torch.tensor([float("inf"), float("-inf"), float("nan")]), 2.4)
    assert special[0] == float("inf") and special[1] == float("inf") and bool(special[2].isnan())


def test_mse_clip_stride_refines_the_coarse_search() -> None:
    """stride k: never worse than every k-th candidate, on the grid, and mostly the exhaustive choice."""
    from lowbit.formats.int import compute_qparams, dequantize_codes, mse_clip, quantize_codes

    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 256, generator=g) * torch.rand(200, 1, generator=g)
    scheme = WeightScheme(bits=3, strategy="group", group_size=64)

    def errors(p: torch.Tensor | float) -> torch.Tensor:
        scale, zero = compute_qparams(w, scheme, torch.float16, clip=p)
        err = dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero, torch.float32) - w
        return err.abs().pow(2.4).reshape(scale.shape[0], scale.shape[1], -1).sum(-1)

    full = mse_clip(w, scheme, F16_SCALES)
    coarse = mse_clip(w, scheme, F16_SCALES, stride=4)
    on_grid = torch.isclose(coarse * 100, torch.round(coarse * 100), atol=1e-3)
    assert bool(on_grid.all()) and bool((coarse > 0.2).all())
    chosen = errors(coarse)
    for i in range(0, 80, 4):
        assert bool((chosen <= errors(1.0 - i / 100)).all())
    assert float((coarse == full).float().mean()) >= 0.9
    assert torch.equal(mse_clip(w, scheme, F16_SCALES, stride=1), full)


def test_mse_clip_keeps_the_full_range_for_non_finite_groups() -> None:
    from lowbit.formats.int import mse_clip

    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    scheme = WeightScheme(bits=4, strategy="group", group_size=32)
    for stride in (1, 4):
        p = mse_clip(w, scheme, F16_SCALES, stride=stride)
        assert p[1, 0] == 1.0 and p[2, 0] == 1.0
        assert bool(((p > 0.2) & (p <= 1.0)).all())
