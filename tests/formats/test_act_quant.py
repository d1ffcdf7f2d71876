"""Dynamic activation quantization: INT4/INT8, per token or per group, symmetric or asymmetric, clipped.

The reference is compressed-tensors' own dynamic quantization (qparams from ``calculate_qparams``, rounding from
``fake_quantize``), and the original INT8 per-token function for the default scheme.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.int import (
    SCALE_EPS,
    dequantize_activation,
    fake_quantize_activation_int,
    quantize_activation,
    quantize_activation_per_token,
)
from lowbit.formats.scheme import ActScheme
from lowbit.kernels.quant_linear import fake_quantize_activation

# (bits, group_size, symmetric, clip_ratio)
CASES = [(b, g, sym, r) for b in (4, 8) for g in (None, 32, 64, 128, 48) for sym in (True, False) for r in (1.0, 0.9)]


def _id(c: tuple) -> str:
    b, g, sym, r = c
    return f"int{b}-{'token' if g is None else f'g{g}'}-{'sym' if sym else 'asym'}-clip{r}"


def _old_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation_per_token as it was before per-group / asymmetric activations."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (absmax / torch.full_like(absmax, ((1 << bits) - 1) / 2)).clamp_min(SCALE_EPS)
    q = torch.round(xf / scale).clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return q.to(torch.int8), scale


def _inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 384) * 2 + 0.3
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1, :64] = 0.0  # all-zero groups
    x[1, 2, 5] = 40.0  # an outlier
    x[2, 3] = x[2, 3].abs()  # a token with no negative value
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_token_sym_is_the_original_function(dtype: torch.dtype) -> None:
    x = _inputs(dtype)
    q_old, s_old = _old_per_token(x)
    q, s, z = quantize_activation(x, 8)
    assert z is None and torch.equal(q, q_old) and torch.equal(s, s_old)
    q2, s2 = quantize_activation_per_token(x)
    assert torch.equal(q2, q_old) and torch.equal(s2, s_old)
    fq = fake_quantize_activation(x, ActScheme())
    assert fq.dtype == dtype and torch.equal(fq, (q_old.float() * s_old).to(dtype))


@pytest.mark.parametrize("case", [c for c in CASES if c[1] is not None], ids=_id)
def test_per_group_is_per_token_of_the_reshaped_tensor(case: tuple) -> None:
    bits, g, sym, r = case
    x = _inputs()
    q, s, z = quantize_activation(x, bits, g, sym, r)
    qt, st, zt = quantize_activation(x.unflatten(-1, (-1, g)), bits, None, sym, r)
    assert torch.equal(q, qt.flatten(-2)) and torch.equal(s, st.squeeze(-1))
    assert (z is None) == sym and (sym or torch.equal(z, zt.squeeze(-1)))
    assert s.shape == (*x.shape[:-1], x.shape[-1] // g)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_codes_range_and_rounding_error(case: tuple) -> None:
    bits, g, sym, r = case
    x = _inputs()
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q, s, z = quantize_activation(x, bits, g, sym, r)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    G = s.shape[-1]
    xg, sg = x.unflatten(-1, (G, -1)), s[..., None]
    x_hat = dequantize_activation(q, s, z).unflatten(-1, (G, -1))
    assert torch.equal(fake_quantize_activation_int(x, bits, g, sym, r), x_hat.flatten(-2))
    if sym:
        hi = xg.abs().amax(-1, keepdim=True) * r
        lo = -hi
    else:
        assert z.dtype == torch.float32 and torch.equal(z, z.round()) and int(z.min()) >= qmin and int(z.max()) <= qmax
        lo = xg.amin(-1, keepdim=True).clamp_max(0) * r
        hi = xg.amax(-1, keepdim=True).clamp_min(0) * r
    inside = (xg >= lo) & (xg <= hi)
    err = (x_hat - xg).abs()
    assert bool((err <= sg / 2 * (1 + 1e-5) + 1e-6)[inside].all())
    # zeros stay exact (0 is on every grid), and so do all-zero tokens and groups
    assert bool((x_hat[xg == 0] == 0).all())


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_clip_ratio_clamps_outliers(bits: int, sym: bool) -> None:
    x = _inputs()
    q1, s1, _ = quantize_activation(x, bits, 64, sym, 1.0)
    q, s, z = quantize_activation(x, bits, 64, sym, 0.5)
    assert torch.allclose(s, (s1 * 0.5).clamp_min(SCALE_EPS), rtol=1e-6)
    x_hat = dequantize_activation(q, s, z)
    # the outlier (40.0, group 0 of token [1, 2]) is cut to the grid's top, within half a step of 20
    assert int(q[1, 2, 5]) == (1 << (bits - 1)) - 1
    assert abs(float(x_hat[1, 2, 5]) - 20.0) <= float(s[1, 2, 0]) / 2 * (1 + 1e-5)
    # clipping shrinks the step: values well inside the range get a smaller error on average
    small = x.abs() < 0.25 * x.unflatten(-1, (6, 64)).abs().amax(-1).repeat_interleave(64, -1)
    e_clip = (x_hat - x).abs()[small].mean()
    e_full = (dequantize_activation(q1, s1, quantize_activation(x, bits, 64, sym)[2]) - x).abs()[small].mean()
    assert e_clip < e_full


CT_CASES = [(b, g, sym) for b in (4, 8) for g in (None, 32, 64, 128) for sym in (True, False)]


@pytest.mark.parametrize("clip", [1.0, 0.8])
@pytest.mark.parametrize("case", CT_CASES, ids=lambda c: f"int{c[0]}-{c[1] or 'token'}-{'sym' if c[2] else 'asym'}")
def test_matches_compressed_tensors(case: tuple, clip: float) -> None:
    """Bit for bit against compressed-tensors: its ``calculate_qparams`` on the same per-token / per-group
    min and max (times the clip ratio, which it does not have) and its ``fake_quantize``; with clip 1.0 also its
    own dynamic path (``compute_dynamic_scales_and_zp`` on a 3-D ``[b, L, K]`` input, as in a model)."""
    ct = pytest.importorskip("compressed_tensors")
    del ct
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

    bits, g, sym = case
    torch.manual_seed(1)
    x = torch.randn(2, 9, 256) * 3 + (0.0 if sym else 0.8)
    x[1, 4, 17] = -25.0
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if g else "token",
                            group_size=g, dynamic=True)
    xg = x.unflatten(-1, (-1, g or x.shape[-1]))
    lo, hi = xg.amin(-1), xg.amax(-1)
    scale, zp = calculate_qparams(lo * clip, hi * clip, args)  # [b, L, G]
    ref = fake_quantize(x, scale, zp, args)
    got = fake_quantize_activation(x, ActScheme("int", bits, "group" if g else "token", sym, g, clip))
    assert torch.equal(got, ref)
    _, s, z = quantize_activation(x, bits, g, sym, clip)
    assert torch.equal(s, scale.reshape(s.shape))
    if not sym:
        assert torch.equal(z, zp.float().reshape(z.shape))
    if clip == 1.0:
        s2, z2 = compute_dynamic_scales_and_zp(x, args, None)
        assert torch.equal(got, fake_quantize(x, s2, z2, args))


def test_zero_point_is_added_before_rounding() -> None:
    """compressed-tensors rounds ``x / s + z``, not ``round(x / s) + z``: they differ on a tie with an odd zero
    point. INT4 asymmetric on [-3, 12, 0.5]: s = 15 / 15 = 1, z = round(-8 + 3) = -5, 0.5 - 5 = -4.5 -> -4."""
    x = torch.tensor([[-3.0, 12.0, 0.5]])
    q, s, z = quantize_activation(x, 4, symmetric=False)
    assert float(s) == 1.0 and float(z) == -5.0 and q.tolist() == [[-8, 7, -4]]
    assert dequantize_activation(q, s, z).tolist() == [[-3.0, 12.0, 1.0]]
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="token", dynamic=True)
    x3 = x[None]  # [1, 1, 3]: compressed-tensors reduces a 2-D input over the whole tensor, a 3-D one per token
    assert torch.equal(fake_quantize(x3, *compute_dynamic_scales_and_zp(x3, args, None), args), x3.new_tensor([[[-3.0, 12.0, 1.0]]]))


def test_kv_cache_shape() -> None:
    """``[b, heads, L, head_dim]`` with one group per head vector, asymmetric: per (b, head, position)."""
    torch.manual_seed(2)
    k = torch.randn(2, 4, 11, 64, dtype=torch.bfloat16)
    act = ActScheme("int", 4, "group", False, group_size=64)
    got = fake_quantize_activation(k, act)
    assert got.shape == k.shape and got.dtype == torch.bfloat16
    ref = fake_quantize_activation(k.reshape(-1, 64), ActScheme("int", 4, "token", False)).reshape(k.shape)
    assert torch.equal(got, ref)
    with pytest.raises(LowbitError, match="does not divide"):
        fake_quantize_activation(k, ActScheme("int", 4, "group", False, group_size=48))


def test_act_scheme_fields_and_names() -> None:
    a = ActScheme()
    assert (a.format, a.bits, a.strategy, a.symmetric, a.group_size, a.clip_ratio) == ("int", 8, "token", True, None, 1.0)
    assert ActScheme("int", 8, "token", True) == a  # the original positional order
    assert a.name == "int8 token sym"
    assert ActScheme(bits=4, symmetric=False, clip_ratio=0.9).name == "int4 token asym clip0.9"
    assert ActScheme(strategy="group", group_size=64).name == "int8 g64 sym"
    assert ActScheme(format="float").name == "fp8-e4m3 token"
    ActScheme(strategy="group", group_size=96).check_features(384, "x")
    a.check_features(100, "x")
    with pytest.raises(LowbitError, match="^layers.0.q: activation group size 64 does not divide its 96 input"):
        ActScheme(strategy="group", group_size=64).check_features(96, "layers.0.q")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "mx"}, "valid: int, float"),
        ({"bits": 6}, r"bits in \(4, 8\)"),
        ({"bits": 16}, r"bits in \(4, 8\)"),
        ({"format": "float", "bits": 4}, "bits must be 8"),
        ({"strategy": "tensor"}, "valid: token, group"),
        ({"strategy": "channel"}, "valid: token, group"),
        ({"strategy": "group"}, "positive int group_size"),
        ({"strategy": "group", "group_size": 0}, "positive int group_size"),
        ({"strategy": "group", "group_size": -32}, "positive int group_size"),
        ({"group_size": 64}, "only meaningful with strategy 'group'"),
        ({"clip_ratio": 0.0}, r"in \(0, 1\]"),
        ({"clip_ratio": 1.5}, r"in \(0, 1\]"),
        ({"clip_ratio": -0.5}, r"in \(0, 1\]"),
        ({"format": "float", "symmetric": False}, "symmetric per token"),
        ({"format": "float", "clip_ratio": 0.9}, "clip_ratio 1.0"),
        ({"format": "float", "strategy": "group", "group_size": 32}, "symmetric per token"),
    ],
)
def test_act_scheme_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match) as e:
        ActScheme(**kwargs)
    assert "\n" not in str(e.value)
