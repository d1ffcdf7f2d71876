"""Every grid through one interface: RTN and GPTQ on FP8/FP6/FP4 (MX, NV), FireQ and DGQ grids; storage round trips."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.blockfp import quantize_mxfp4
from lowbit.formats.fp import E2M1, E3M2, E4M3, decode_fp, fp_format, round_to_fp
from lowbit.formats.grid import compute_params, dequantize_values, round_values
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.formats.storage import empty_buffers, from_buffers, storage_format, stored_bits, to_buffers
from lowbit.errors import LowbitError
from lowbit.quantize.gptq import gptq
from lowbit.quantize.rtn import rtn_weight

FP8 = WeightScheme("float", 8, "channel", None, fp="e4m3")
FP6 = WeightScheme("float", 6, "channel", None, fp="e3m2")
NVFP4 = WeightScheme("float", 4, "group", 16, fp="e2m1", scale_format="e4m3")
MXFP4 = WeightScheme("float", 4, "group", 32, fp="e2m1", scale_format="e8m0")
FIREQ = WeightScheme("int", 4, "group", 64, scale_format="e4m3")
DGQ = WeightScheme("int", 4, "group", 64, symmetric=False, scale_format="dual")
GRIDS = {"fp8": FP8, "fp6": FP6, "nvfp4": NVFP4, "mxfp4": MXFP4, "fireq": FIREQ, "dgq": DGQ}
# Relative Frobenius error of RTN on Gaussian weights, an upper bound per grid (FP8 ~2-3 %, FP6 ~5 %,
# FP4 ~9-11 %, INT4 g64 ~10 %); a broken grid gives errors near or above 100 %.
MAX_REL_ERR = {"fp8": 0.04, "fp6": 0.075, "nvfp4": 0.13, "mxfp4": 0.16, "fireq": 0.14, "dgq": 0.14}


def _w(out_f: int = 48, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[3, 17] = 0.3  # an outlier
    return W


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_on_every_grid(name: str, dtype: torch.dtype) -> None:
    scheme, W = GRIDS[name], _w()
    qw = rtn_weight(W, scheme, Precision(dtype, dtype))
    W_hat = qw.dequantize()
    assert torch.equal(W_hat, W_hat.to(dtype).float())  # w_hat is exact in the model dtype
    rel = float((W_hat - W).norm() / W.norm())
    assert 0.0 < rel < MAX_REL_ERR[name]
    # RTN is the nearest grid point: re-rounding the dequantized weight gives the same values
    q = round_values(W_hat, qw.params, scheme, W.shape[1])
    assert torch.equal(dequantize_values(q, qw.params, scheme, W.shape[1], dtype), W_hat)


def test_float_codes_are_element_bit_patterns() -> None:
    W = _w()
    for scheme, fmt in ((FP8, E4M3), (FP6, E3M2), (NVFP4, E2M1)):
        qw = rtn_weight(W, scheme)
        assert qw.codes.dtype == torch.uint8
        values = decode_fp(qw.codes, fmt)
        assert torch.equal(values, round_to_fp(values, fmt))
    fp8 = rtn_weight(W, FP8, Precision(torch.float32, torch.float16))
    s = fp8.scale  # [out, 1] row scales exact in fp16, absmax on the grid's max
    assert torch.equal(s, s.half().float())
    assert torch.equal(fp8.codes, (W / s).to(torch.float8_e4m3fn).view(torch.uint8))


def test_mxfp4_matches_the_block_primitive() -> None:
    W = _w()
    qw = rtn_weight(W, MXFP4)
    codes, scale_codes = quantize_mxfp4(W)
    assert torch.equal(qw.codes, codes)
    assert torch.equal(to_buffers(qw)["weight_scale"], scale_codes)


def test_nvfp4_scales() -> None:
    W = _w()
    p = compute_params(W, NVFP4)
    G = float(p.global_scale)
    assert G == pytest.approx(448 * 6 / float(W.abs().max()))
    assert torch.equal(p.scale, round_to_fp(p.scale, E4M3)) and float(p.scale.max()) <= 448
    # the largest block reaches the top of the E4M3 scale range
    assert float(p.scale.max()) == pytest.approx(448, rel=0.07)


def test_fireq_power_of_two_prescale() -> None:
    W = _w() * 1e-3  # tiny weights: without the pre-scale, group scales underflow E4M3
    p = compute_params(W, FIREQ)
    shift = torch.log2(p.global_scale)
    assert float(shift) == round(float(shift)) and float(shift) > 0
    assert float(p.scale.min()) >= 2.0**-9
    amax = W.reshape(48, -1, 64).abs().amax(-1) * p.global_scale
    assert float(amax.max()) <= 448
    assert (rtn_weight(W, FIREQ).dequantize() - W).norm() / W.norm() < MAX_REL_ERR["fireq"]


def test_dgq_products_fit_int8() -> None:
    W = _w()
    qw = rtn_weight(W, DGQ)
    m = qw.scale
    assert torch.equal(m, m.round()) and float(m.min()) >= 1 and float(m.max()) <= 127
    z = qw.zero.float().repeat_interleave(64, dim=1)
    w8 = (qw.codes.float() - z) * m.repeat_interleave(64, dim=1)
    assert float(w8.abs().max()) <= 127
    assert qw.channel_scale.shape == (48, 1)


@pytest.mark.parametrize("name", GRIDS)
def test_gptq_on_every_grid_beats_rtn(name: str) -> None:
    scheme = GRIDS[name]
    g = torch.Generator().manual_seed(1)
    W = _w()
    X = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    H = X.T @ X / X.shape[0]
    res = gptq(W, H, scheme)
    assert res.note is None
    r = rtn_weight(W, scheme)

    def err(W_hat: torch.Tensor) -> float:
        D = W_hat - W
        return float(torch.einsum("oi,ij,oj->", D, H, D))

    assert res.qweight.scheme == r.scheme
    assert err(res.qweight.dequantize()) < 0.9 * err(r.dequantize())
    # the codes GPTQ chose sit on the same grid: re-rounding changes nothing
    q = round_values(res.qweight.dequantize(), res.qweight.params, scheme, 256)
    assert torch.equal(dequantize_values(q, res.qweight.params, scheme, 256), res.qweight.dequantize())


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_storage_round_trip(name: str, dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
    scheme, W = GRIDS[name], _w()
    qw = rtn_weight(W, scheme, Precision(dtype, scale_dtype))
    buffers = to_buffers(qw)
    empty = empty_buffers(scheme, 48, 256, scale_dtype)
    assert {k: (v.shape, v.dtype) for k, v in buffers.items()} == {k: (v.shape, v.dtype) for k, v in empty.items()}
    assert stored_bits(scheme, 48, 256, scale_dtype) == 8 * sum(v.numel() * v.element_size() for v in buffers.values())
    back = from_buffers(buffers, scheme, 48, 256, dtype)
    assert torch.equal(back.dequantize(dtype), qw.dequantize(dtype))
    assert torch.equal(back.codes, qw.codes)


def test_storage_formats() -> None:
    assert [storage_format(s) for s in GRIDS.values()] == [
        "float-quantized", "lowbit-fp6-pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
        "lowbit-fp8scale-pack-quantized", "lowbit-dual-pack-quantized",
    ]
    with pytest.raises(LowbitError, match="block scales"):  # no storage format exists: refused up front
        WeightScheme("float", 4, "channel", None, fp="e2m1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"format": "float", "bits": 4, "fp": "e3m2"},  # width mismatch
        {"format": "float", "bits": 4, "fp": None},
        {"format": "float", "bits": 4, "fp": "e2m1", "symmetric": False},
        {"format": "int", "bits": 4, "fp": "e2m1"},
        {"format": "int", "bits": 3, "scale_format": "dual"},
        {"format": "int", "bits": 4, "scale_format": "e4m3", "symmetric": False},
        {"format": "float", "bits": 6, "fp": "e3m2", "scale_format": "e8m0"},
        {"format": "int", "bits": 4, "scale_format": "fp16"},
        {"format": "int", "bits": 4, "scale_format": "dual", "symmetric": True},  # DGQ groups are asymmetric
        {"format": "int", "bits": 8, "scale_format": "e4m3"},
        {"format": "float", "bits": 8, "fp": "e4m3", "scale_format": "e4m3"},
        {"format": "float", "bits": 4, "fp": "e2m1", "scale_format": "e8m0", "group_size": 64},  # MX blocks are 32
        {"format": "float", "bits": 4, "fp": "e2m1", "scale_format": "e4m3", "group_size": 128},  # NV blocks are 16
    ],
)
def test_bad_schemes_are_clear_errors(kwargs: dict) -> None:
    with pytest.raises(LowbitError):
        WeightScheme(**kwargs)


def test_group_fallback_keeps_the_grid() -> None:
    s = NVFP4.for_layer(172)  # 16 does not divide 172: one scale per row, same element and scale format
    assert (s.strategy, s.fp, s.scale_format) == ("channel", "e2m1", "e4m3")
    assert fp_format(s.fp or "").max == 6


def test_tensor_wide_scales_are_float32_on_the_weight_device() -> None:
    for scheme in (FIREQ, NVFP4):
        p = compute_params(_w(), scheme)
        assert p.global_scale.device == p.scale.device and p.global_scale.dtype == torch.float32


def test_round_together_keeps_one_global_scale_per_layer() -> None:
    from lowbit.quantize.options import RoundingOptions
    from lowbit.quantize.rounding import ROUNDERS, round_together

    small, big = _w(seed=1) * 1e-3, _w(seed=2)  # FireQ pre-scales the small one by a power of two, not the big
    for scheme in (NVFP4, FIREQ):
        res = round_together(ROUNDERS["rtn"], [small, big], None, scheme, Precision(), RoundingOptions())
        alone = [rtn_weight(W, scheme) for W in (small, big)]
        for r, a in zip(res, alone):
            assert torch.equal(r.qweight.global_scale, a.global_scale)
            assert torch.equal(r.qweight.dequantize(), a.dequantize())
        assert not torch.equal(res[0].qweight.global_scale, res[1].qweight.global_scale)


@pytest.mark.parametrize("name", GRIDS)
def test_config_round_trip(name: str) -> None:
    """Every grid's config group reads back as the same scheme (elements compressed-tensors cannot name are in
    the lowbit section: the FP6 preset's E3M2, since compressed-tensors reads FP6 as E2M3)."""
    import json

    from lowbit.formats.checkpoint import LayerScheme, build_quantization_config, parse_quantization_config

    scheme = GRIDS[name]
    ls = LayerScheme(scheme, None, storage_format(scheme))
    qc = json.loads(json.dumps(build_quantization_config({"layer": ls}, [], {})))
    groups, _ = parse_quantization_config(qc)
    assert groups == [(["layer"], ls)]
    assert ("fp_elements" in qc["lowbit"]) == (name == "fp6")
