"""QuantLinear: the packed path equals the fake-quant path bit for bit, and buffers round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats.int import fake_quantize, quantize_activation_per_token
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.kernels.dispatch import Backend, resolve_backend
from lowbit.kernels.quant_linear import INT, PACKED, QuantLinear
from lowbit.quantize.rtn import rtn_weight as rtn
from lowbit.errors import LowbitError

SCHEMES = [
    WeightScheme(bits=4, strategy="group", group_size=32),
    WeightScheme(bits=4, strategy="group", group_size=32, symmetric=False),
    WeightScheme(bits=3, strategy="channel", group_size=None),
    WeightScheme(bits=2, strategy="group", group_size=64, symmetric=False),
    WeightScheme(bits=8, strategy="channel", group_size=None),
    WeightScheme(bits=8, strategy="group", group_size=32, symmetric=False),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.bits}b-{s.strategy}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("act", [None, ActScheme()], ids=["a16", "a8"])
def test_packed_path_equals_fake_quant(scheme: WeightScheme, act: ActScheme | None) -> None:
    torch.manual_seed(0)
    W, b, x = torch.randn(48, 128), torch.randn(48), torch.randn(3, 5, 128)
    layer = QuantLinear.from_quantized(rtn(W, scheme), act, torch.float32, b)
    assert layer.format == (INT if scheme.bits == 8 else PACKED)
    x_in = x
    if act is not None:
        q, s = quantize_activation_per_token(x)
        x_in = q.float() * s
    expected = F.linear(x_in, fake_quantize(W, scheme), b)
    assert torch.equal(layer(x), expected)


def test_activation_quantization_changes_the_output() -> None:
    torch.manual_seed(0)
    W, x = torch.randn(16, 64), torch.randn(4, 64)
    qw = rtn(W, SCHEMES[0])
    a16 = QuantLinear.from_quantized(qw, None, torch.float32)(x)
    a8 = QuantLinear.from_quantized(qw, ActScheme(), torch.float32)(x)
    assert not torch.equal(a16, a8)
    assert (a16 - a8).abs().max() < 0.05 * a16.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=str)
def test_state_dict_round_trip(scheme: WeightScheme) -> None:
    torch.manual_seed(1)
    W = torch.randn(40, 128)
    src = QuantLinear.from_quantized(rtn(W, scheme), None, torch.float32)
    dst = QuantLinear(128, 40, scheme, None, torch.float32)
    x = torch.randn(2, 128)
    dst(x)  # fills the dequantized cache, which loading must invalidate
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst.quantized_weight().codes, src.quantized_weight().codes)


def test_bf16_model_dtype() -> None:
    torch.manual_seed(2)
    W = torch.randn(32, 64, dtype=torch.bfloat16)
    qw = rtn(W, SCHEMES[0], Precision(torch.bfloat16, torch.bfloat16))
    layer = QuantLinear.from_quantized(qw, None, torch.bfloat16)
    assert layer.weight_scale.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, fake_quantize(W, SCHEMES[0], torch.bfloat16)))


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") is Backend.TORCH
    assert resolve_backend(Backend.TORCH, "cpu") is Backend.TORCH
    with pytest.raises(LowbitError, match="valid: auto, triton, torch"):
        resolve_backend("cutlass", "cpu")
    with pytest.raises(LowbitError):
        resolve_backend("triton", "cpu")


FP_LAYERS = {
    "w8a8-fp8": (WeightScheme("float", 8, "channel", None, fp="e4m3"), ActScheme(format="float")),
    "w6a16-fp6": (WeightScheme("float", 6, "channel", None, fp="e3m2"), None),
    "w4a16-nvfp4": (WeightScheme("float", 4, "group", 16, fp="e2m1", scale_format="e4m3"), None),
    "w4a16-mxfp4": (WeightScheme("float", 4, "group", 32, fp="e2m1", scale_format="e8m0"), None),
    "w4a8-dgq": (WeightScheme("int", 4, "group", 64, symmetric=False, scale_format="dual"), ActScheme()),
    "w4a8-fp8": (WeightScheme("int", 4, "group", 64, scale_format="e4m3"), ActScheme(format="float")),
}


@pytest.mark.parametrize("name", FP_LAYERS)
def test_every_grid_runs_as_its_fake_quant(name: str) -> None:
    from lowbit.kernels.quant_linear import fake_quantize_activation

    scheme, act = FP_LAYERS[name]
    torch.manual_seed(0)
    W, b, x = torch.randn(48, 128) * 0.05, torch.randn(48), torch.randn(3, 5, 128)
    qw = rtn(W, scheme)
    layer = QuantLinear.from_quantized(qw, act, torch.float32, b)
    x_in = x if act is None else fake_quantize_activation(x, act)
    assert torch.equal(layer(x), F.linear(x_in, qw.dequantize(), b))
    # the buffers hold it all: a fresh layer loading the state dict computes the same
    dst = QuantLinear(128, 48, scheme, act, torch.float32, bias=True)
    dst.load_state_dict(layer.state_dict())
    assert torch.equal(dst(x), layer(x))


def test_fp8_activation_rounding() -> None:
    from lowbit.kernels.quant_linear import fake_quantize_activation

    from lowbit.formats.fp import E4M3, round_to_fp

    x = torch.randn(64, 256) * 3
    x[0, :4] = torch.tensor([1.0, -1.0, 1.0 + 1 / 16, 1.0 + 3 / 16]) * x[0].abs().max()  # exact ties after scaling
    xq = fake_quantize_activation(x, ActScheme(format="float"))
    s = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(xq, round_to_fp(x / s, E4M3) * s)
    assert 0 < float((xq - x).abs().max()) <= float(x.abs().max()) / 16  # 3 mantissa bits


TRITON_LAYERS = {
    "w4a16": (WeightScheme(bits=4, strategy="group", group_size=32), None),
    "w4a16-asym": (WeightScheme(bits=4, strategy="group", group_size=64, symmetric=False), None),
    "w8a8": (WeightScheme(bits=8, strategy="channel", group_size=None), ActScheme()),
    **FP_LAYERS,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", TRITON_LAYERS)
def test_triton_path_matches_the_reference(name: str, dtype: torch.dtype, device: str) -> None:
    """QuantLinear's Triton path (the interpreter on CPU) against its torch path, through the dispatch.

    Tolerance 1e-2 of max|y| for 16-bit outputs (one rounding of the output, different summation order),
    2e-3 for float32 (FP8 dots accumulate with ~14-bit partial sums on Hopper; exact on the interpreter).
    """
    scheme, act = TRITON_LAYERS[name]
    torch.manual_seed(0)
    W, b = torch.randn(48, 128) * 0.05, torch.randn(48)
    layer = QuantLinear.from_quantized(rtn(W, scheme, Precision.of_model(dtype)), act, dtype, b.to(dtype)).to(device)
    assert layer.kernel_args() != (), f"{name} has no Triton kernel"
    x = torch.randn(2, 3, 128).to(dtype).to(device)
    layer.backend = Backend.TORCH
    expected = layer(x)
    layer.backend = Backend.TRITON
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = (2e-3 if dtype == torch.float32 else 1e-2) * float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=0)


def test_layers_without_a_kernel_take_the_reference_path(device: str) -> None:
    torch.manual_seed(0)
    scheme = WeightScheme(bits=3, strategy="group", group_size=32)
    layer = QuantLinear.from_quantized(rtn(torch.randn(16, 64), scheme), None, torch.float32).to(device)
    assert layer.kernel_args() == ()
    # stories260K's 172-wide MLP input: INT4 words would straddle the row end, no kernel takes it
    w4 = QuantLinear.from_quantized(rtn(torch.randn(16, 172), WeightScheme(bits=4, strategy="channel", group_size=None)), None, torch.float32)
    assert w4.kernel_args() == ()
    x = torch.randn(4, 64, device=device)
    layer.backend = Backend.TORCH
    expected = layer(x)
    layer.backend = Backend.TRITON
    assert torch.equal(layer(x), expected)


def test_auto_falls_back_where_the_kernel_was_measured_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import triton_gemms

    monkeypatch.setitem(triton_gemms.FASTER_THAN_FP16, "w4a16", frozenset({1, 16, 4096}))
    assert triton_gemms.wins("w4a16", 1) and triton_gemms.wins("w4a16", 8) and triton_gemms.wins("w4a16", 16)
    assert not triton_gemms.wins("w4a16", 17) and not triton_gemms.wins("w4a16", 1024)
    assert not triton_gemms.wins("w4a16", 2048)  # 1024 lost, 4096 won: not both neighbours
    assert triton_gemms.wins("w4a16", 4096) and triton_gemms.wins("w4a16", 10**6)
    monkeypatch.setitem(triton_gemms.FASTER_THAN_FP16, "w4a16", None)
    assert triton_gemms.wins("w4a16", 12345)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", FP_LAYERS)
def test_dtype_casts_keep_the_stored_weight(name: str, scale_dtype: torch.dtype) -> None:
    """``.to(bfloat16)`` casts float scales in the model dtype and the bias like a float layer, never codes,
    FP8/float32 scales or float16 scales of a float32 model."""
    scheme, act = FP_LAYERS[name]
    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.05
    layer = QuantLinear.from_quantized(rtn(W, scheme, Precision(torch.float32, scale_dtype)), act, torch.float32, torch.randn(48))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer = layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    after = layer.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        if k == "bias" or (k == "weight_scale" and v.dtype.is_floating_point and v.dtype.itemsize > 1):
            assert after[k].dtype == torch.bfloat16
            assert torch.equal(after[k].float(), v.bfloat16().float())
        else:
            assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


NEW_ACTS = [
    ActScheme(bits=4, strategy="group", group_size=32, symmetric=False),
    ActScheme(bits=4, strategy="group", group_size=64, symmetric=False, clip_ratio=0.9),
    ActScheme(bits=4),
    ActScheme(bits=8, strategy="group", group_size=32),
    ActScheme(bits=8, symmetric=False),
    ActScheme(bits=8, clip_ratio=0.95),
]


@pytest.mark.parametrize("act", NEW_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[4]], ids=["w4-g32", "w8-channel"])
def test_new_activation_schemes_run_as_their_fake_quant(scheme: WeightScheme, act: ActScheme) -> None:
    """INT4 / per-group / asymmetric / clipped activations: ``F.linear(fake_quant(x), W_hat)``, on the torch path
    whatever the backend (no Triton kernel quantizes them)."""
    from lowbit.formats.int import fake_quantize_activation_int
    from lowbit.kernels.quant_linear import fake_quantize_activation

    torch.manual_seed(0)
    W, b, x = torch.randn(48, 128), torch.randn(48), torch.randn(3, 5, 128)
    qw = rtn(W, scheme)
    layer = QuantLinear.from_quantized(qw, act, torch.float32, b)
    assert layer.kernel_args() == ()
    x_in = fake_quantize_activation_int(x, act.bits, act.group_size, act.symmetric, act.clip_ratio)
    assert torch.equal(fake_quantize_activation(x, act), x_in)
    expected = F.linear(x_in, fake_quantize(W, scheme), b)
    assert torch.equal(layer(x), expected)
    layer.backend = Backend.TRITON
    assert torch.equal(layer(x), expected)  # no kernel: the torch path, even when Triton is asked for
    a8 = QuantLinear.from_quantized(qw, ActScheme(), torch.float32, b)(x)
    assert not torch.equal(layer(x), a8)


def test_group_activation_size_must_divide_the_input() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_quantized(rtn(torch.randn(16, 96), SCHEMES[0]), ActScheme(bits=4, strategy="group", group_size=64),
                                       torch.float32)
    with pytest.raises(LowbitError, match="group size 64 does not divide its 96"):
        layer(torch.randn(2, 96))


@pytest.mark.parametrize("act", NEW_ACTS, ids=lambda a: a.name)
def test_prepare_takes_only_unclipped_8bit_symmetric_per_token_activations(act: ActScheme) -> None:
    """The W8A8 / A8W4 / INT4-FP8 kernels quantize activations 8-bit symmetric per token: every other
    activation scheme gets ``()`` from prepare (the torch path), where the default scheme gets a kernel."""
    from lowbit.kernels import triton_gemms

    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.05
    for name in ("w8a8", "w4a8-dgq"):
        scheme, default = TRITON_LAYERS[name]
        qw = rtn(W, scheme)
        base = QuantLinear.from_quantized(qw, default, torch.float32)
        assert base.kernel_args() != ()
        layer = QuantLinear.from_quantized(qw, act, torch.float32)
        assert triton_gemms.prepare(layer.scheme, act, layer.format, 128, layer._stored()) == ()
        assert layer.kernel_args() == ()
