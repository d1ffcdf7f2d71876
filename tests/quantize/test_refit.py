"""Scale refit after GPTQ: the least-squares optimum for fixed codes, never worse, zero groups untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.formats.int import compute_qparams, quantize_codes
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.gptq import gptq
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.refit import refit_group_scales

F16_SCALES = Precision(torch.float32, torch.float16)  # a float32 model's default: float16 scales


def _problem(seed: int, n: int = 1024, k: int = 128, out: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = (torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 3) @ mix
    return torch.randn(out, k, generator=g), X.T @ X / n


def _proxy_rows(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = (W - W_hat).double()
    return torch.einsum("oi,ij,oj->o", d, H.double(), d)


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_is_the_least_squares_optimum(symmetric: bool) -> None:
    W, H = _problem(0)
    scheme = WeightScheme(bits=3, strategy="group", group_size=32, symmetric=symmetric)
    scale, zero = compute_qparams(W, scheme, torch.float32)
    codes = quantize_codes(W, scale, zero, scheme).float()
    new = refit_group_scales(W, H, codes, scale, zero, torch.float32)
    # brute force, row by row: w_hat = C s with C [in, G] the codes in their group's column block
    c = codes - (0 if zero is None else zero.float().repeat_interleave(32, dim=1))
    L = torch.linalg.cholesky(H.double())
    for o in range(0, W.shape[0], 7):
        C = torch.zeros(W.shape[1], scale.shape[1], dtype=torch.float64)
        for a in range(scale.shape[1]):
            C[a * 32 : (a + 1) * 32, a] = c[o, a * 32 : (a + 1) * 32].double()
        s = torch.linalg.lstsq(L.T @ C, L.T @ W[o].double()).solution  # min ||L^T (w - C s)||^2
        assert torch.allclose(new[o].double(), s, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False), (2, False)])
def test_gptq_with_refit_never_raises_the_layer_error(bits: int, symmetric: bool) -> None:
    W, H = _problem(1)
    scheme = WeightScheme(bits=bits, strategy="group", group_size=32, symmetric=symmetric)
    base = RoundingOptions(order="gar", static_groups=False, mse_clip=True)
    plain = gptq(W, H, scheme, F16_SCALES, base)
    refit = gptq(W, H, scheme, F16_SCALES, dataclasses.replace(base, refit_scales=True))
    assert torch.equal(plain.qweight.codes, refit.qweight.codes)  # only the scales move
    before = _proxy_rows(W, plain.qweight.dequantize(torch.float32), H)
    after = _proxy_rows(W, refit.qweight.dequantize(torch.float32), H)
    assert bool((after <= before).all())
    assert float(after.sum()) < 0.97 * float(before.sum())
    assert refit.qweight.scale.dtype == plain.qweight.scale.dtype


def test_groups_of_zero_codes_keep_their_scale() -> None:
    W, H = _problem(2)
    W[:5, :32] = 0.0  # first group of five rows: all codes 0
    scheme = WeightScheme(bits=4, strategy="group", group_size=32)
    scale, zero = compute_qparams(W, scheme, torch.float16)
    codes = quantize_codes(W, scale, zero, scheme).float()
    new = refit_group_scales(W, H, codes, scale, zero, torch.float16)
    assert torch.equal(new[:5, 0], scale[:5, 0])
    assert bool((new > 0).all()) and torch.equal(new, new.half().float())


def test_rows_refit_in_chunks_give_the_same_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large layers are refit a chunk of rows at a time (bounded memory); rows are independent problems."""
    import lowbit.quantize.refit as refit_module

    W, H = _problem(4)
    scheme = WeightScheme(bits=4, strategy="group", group_size=32, symmetric=False)
    scale, zero = compute_qparams(W, scheme, torch.float16)
    codes = quantize_codes(W, scale, zero, scheme).float()
    whole = refit_group_scales(W, H, codes, scale, zero, torch.float16)
    monkeypatch.setattr(refit_module, "REFIT_BYTES", 4 * 4 * 128 * 5)  # 5 rows per chunk
    chunked = refit_group_scales(W, H, codes, scale, zero, torch.float16)
    assert torch.allclose(chunked, whole, rtol=1e-3) and not torch.equal(whole, scale)
