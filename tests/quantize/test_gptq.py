"""GPTQ: never worse than RTN on its own objective, robust to bad Hessians, natural group layout."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.gptq import column_order, gptq, inverse_hessian_factor
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.rtn import rtn_weight

F16_SCALES = Precision(torch.float32, torch.float16)  # a float32 model's default: float16 scales


def _problem(seed: int, n: int = 2048, k: int = 128, out: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs (as in real activations) and a weight matrix."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = (torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 3) @ mix
    return torch.randn(out, k, generator=g), X.T @ X / n


def _proxy(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    d = W - W_hat
    return float(torch.einsum("oi,ij,oj->", d, H, d))


SCHEMES = [
    WeightScheme(bits=4, strategy="group", group_size=32),
    WeightScheme(bits=3, strategy="group", group_size=64, symmetric=False),
    WeightScheme(bits=2, strategy="channel", group_size=None, symmetric=False),
    WeightScheme(bits=8, strategy="channel", group_size=None),
]
OPTIONS = [
    RoundingOptions(),
    RoundingOptions(order="gar", static_groups=False),
    RoundingOptions(order="natural", static_groups=False, mse_clip=True),
    RoundingOptions(order="gar", static_groups=True, block_size=16),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.bits}b-{s.strategy}")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.order}-static{o.static_groups}-mse{o.mse_clip}")
@pytest.mark.parametrize("precision", [Precision(), F16_SCALES], ids=["f32-scales", "f16-scales"])
def test_gptq_beats_rtn(scheme: WeightScheme, options: RoundingOptions, precision: Precision) -> None:
    W, H = _problem(0)
    res = gptq(W, H, scheme, precision, options)
    assert res.note is None
    rtn = rtn_weight(W, scheme, precision, options)
    assert _proxy(W, res.qweight.dequantize(), H) < _proxy(W, rtn.dequantize(), H)
    assert res.qweight.codes.min() >= scheme.qmin and res.qweight.codes.max() <= scheme.qmax
    # The reported loss is GPTQ's objective, sum_j (w_j - q_j)^2 / [H^-1]_jj / 2 over the processed columns,
    # and by the OBS identity twice it is the output error of the weights as stored, on the damped H: equal up
    # to float32 round-off (~1e-6 measured). Had the column loop compensated other weights than those stored (a
    # product rounded to float16 that the loaders compute exactly in float32), they would differ by 3e-5 to 4e-4.
    H_damped = H.double() + options.damp * H.diagonal().double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    assert res.loss is not None
    assert 2 * res.loss == pytest.approx(_proxy(W.double(), res.qweight.dequantize().double(), H_damped), rel=1e-5)


def test_diagonal_hessian_gives_rtn_codes() -> None:
    """With no correlation there is nothing to compensate: static-group GPTQ equals RTN in any order."""
    W, _ = _problem(3)
    H = torch.diag(torch.rand(128) + 0.5)
    scheme = SCHEMES[0]
    for order in ("actorder", "gar", "natural"):
        res = gptq(W, H, scheme, Precision(), RoundingOptions(order=order, static_groups=True))
        assert torch.equal(res.qweight.codes, rtn_weight(W, scheme).codes)


def test_static_actorder_keeps_natural_groups() -> None:
    W, H = _problem(4)
    scheme = SCHEMES[0]
    res = gptq(W, H, scheme, Precision(), RoundingOptions(order="actorder"))
    # static groups: the scales are RTN's scales of the original W, in natural group order
    assert torch.equal(res.qweight.scale, rtn_weight(W, scheme).scale)


@pytest.mark.parametrize(
    "H",
    [
        torch.zeros(128, 128),  # a layer that never saw a nonzero input
        torch.ones(128, 128),  # rank 1
        torch.diag(torch.cat([torch.ones(64), torch.zeros(64)])),  # half the inputs dead
    ],
    ids=["zero", "rank1", "dead-half"],
)
def test_degenerate_hessians_do_not_crash(H: torch.Tensor) -> None:
    W, _ = _problem(5)
    res = gptq(W, H, SCHEMES[0], Precision(), RoundingOptions())
    assert torch.isfinite(res.qweight.dequantize()).all()
    dead = H.diagonal() == 0
    assert (res.qweight.dequantize()[:, dead] == 0).all()


def test_indefinite_hessian_escalates_then_falls_back() -> None:
    W, H = _problem(6)
    bumpy = H.clone()
    bumpy[0, 1] = bumpy[1, 0] = 10 * float(H.diagonal().max())  # not positive definite at small damping
    res = gptq(W, bumpy, SCHEMES[0], Precision(), RoundingOptions())
    assert res.note is not None and "damping" in res.note
    # off-diagonal mass no damping (< mean diag) or floor (< max diag / 10) can outweigh: eigenvalue -999
    hopeless = torch.eye(128) + 1000 * (torch.ones(128, 128) - torch.eye(128))
    res = gptq(W, hopeless, SCHEMES[0], Precision(), RoundingOptions())
    assert res.note is not None and "RTN" in res.note
    assert torch.equal(res.qweight.codes, rtn_weight(W, SCHEMES[0]).codes)


def test_nan_hessian_falls_back_to_rtn() -> None:
    W, H = _problem(7)
    H[3, 3] = float("nan")
    res = gptq(W, H, SCHEMES[0], Precision(), RoundingOptions())
    assert "RTN" in (res.note or "")


def test_column_orders() -> None:
    diag = torch.tensor([1.0, 5, 2, 3, 9, 0, 1, 1])
    assert column_order(diag, 4, "natural").tolist() == list(range(8))
    assert column_order(diag, 4, "actorder").tolist() == [4, 1, 3, 2, 0, 6, 7, 5]
    # gar: group 1 (max 9) first, then group 0 (max 5); inside each, descending diag
    assert column_order(diag, 4, "gar").tolist() == [4, 6, 7, 5, 1, 3, 2, 0]


def test_inverse_factor_is_the_inverse() -> None:
    _, H = _problem(8)
    H = H.double()  # float64 so the check measures the algebra, not float32 conditioning
    U, note = inverse_hessian_factor(H, 0.0)
    assert note is None
    torch.testing.assert_close(U.T @ U @ H, torch.eye(128, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.equal(U, U.triu())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("options", [OPTIONS[1], OPTIONS[0]], ids=["gar-mse", "actorder-static"])
def test_rounding_together_equals_one_by_one(method: str, options: RoundingOptions) -> None:
    """q/k/v (or gate/up) share H: one call on the stacked rows gives each layer's own result."""
    from lowbit.quantize.methods import ROUNDERS
    from lowbit.quantize.rounding import round_together

    options = RoundingOptions(order=options.order, static_groups=options.static_groups, mse_clip=True)
    g = torch.Generator().manual_seed(5)
    _, H = _problem(5)
    Ws = [torch.randn(rows, 128, generator=g) for rows in (48, 16, 16)]
    scheme = WeightScheme(bits=4, strategy="group", group_size=32)
    together = round_together(ROUNDERS[method], Ws, H, scheme, F16_SCALES, options)
    for W, res in zip(Ws, together):
        alone = ROUNDERS[method].fn(W, H, scheme, F16_SCALES, options)
        assert torch.equal(res.qweight.codes, alone.qweight.codes)
        assert torch.equal(res.qweight.scale, alone.qweight.scale)
        assert res.qweight.shape == W.shape
        if method == "gptq":
            assert res.loss == pytest.approx(alone.loss, rel=1e-5)
            assert res.row_loss is not None and res.row_loss.shape == (W.shape[0],)
        else:
            assert res.loss is None


def test_tensor_scales_are_not_stacked() -> None:
    from lowbit.quantize.methods import ROUNDERS
    from lowbit.quantize.rounding import round_together

    _, H = _problem(6)
    Ws = [torch.randn(8, 128), 10 * torch.randn(8, 128)]
    scheme = WeightScheme(bits=8, strategy="tensor", group_size=None)
    res = round_together(ROUNDERS["rtn"], Ws, H, scheme, Precision(), RoundingOptions())
    for W, r in zip(Ws, res):
        assert float(r.qweight.scale.reshape(())) == pytest.approx(float(W.abs().max()) / 127, rel=1e-6)


@pytest.mark.parametrize("options", [OPTIONS[1], RoundingOptions(mse_clip=True)], ids=["gar-onthefly", "actorder-static"])
def test_rows_are_rounded_independently(options: RoundingOptions) -> None:
    """A row's codes, scales and loss depend only on that row and H: two halves rounded apart equal the whole."""
    g = torch.Generator().manual_seed(7)
    _, H = _problem(7)
    W = torch.randn(600, 128, generator=g)
    scheme = WeightScheme(bits=3, strategy="group", group_size=32, symmetric=False)
    halves = [gptq(W[:300], H, scheme, F16_SCALES, options), gptq(W[300:], H, scheme, F16_SCALES, options)]
    whole = gptq(W, H, scheme, F16_SCALES, options)

    for field in ("codes", "scale", "zero"):
        assert torch.equal(torch.cat([getattr(h.qweight, field) for h in halves]), getattr(whole.qweight, field))
    assert torch.equal(torch.cat([h.row_loss for h in halves]), whole.row_loss)


def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, scheme: WeightScheme, precision: Precision,
                   options: RoundingOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fasterquant written plainly (row-major block, one rank-1 update per column, group scales when a group
    starts), for the plain int grid with on-the-fly groups: the arithmetic the optimised loop must keep."""
    from lowbit.formats.int import compute_qparams, mse_clip

    out_f, in_f = W.shape
    gs = scheme.group_size
    perm = column_order(H.diagonal(), gs, options.order)
    U, _ = inverse_hessian_factor(H[perm][:, perm], options.damp)
    Wp = W.float().clone()[:, perm]
    codes = torch.empty(out_f, in_f)
    scale = torch.empty(out_f, in_f // gs)
    zero = None if scheme.symmetric else torch.empty(out_f, in_f // gs, dtype=torch.int8)
    B = max(gs, options.block_size // gs * gs)
    per_row = scheme.per_row()
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1, U1, E1 = Wp[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros(out_f, i2 - i1)
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // gs
            if (i1 + i) % gs == 0:
                clip = mse_clip(W1[:, i : i + gs].contiguous(), per_row, precision) if options.mse_clip else 1.0
                s_g, z_g = compute_qparams(W1[:, i : i + gs], per_row, precision.scale_dtype, clip)
                scale[:, g] = s_g[:, 0]
                if zero is not None:
                    zero[:, g] = z_g[:, 0]
            s = scale[:, g]
            z = None if zero is None else zero[:, g].float()
            w = W1[:, i]
            q = torch.round(w / s) if z is None else torch.round(w / s) + z
            q = q.clamp(scheme.qmin, scheme.qmax)
            dq = ((q if z is None else q - z) * s).to(precision.dtype).float()
            codes[:, perm[i1 + i]] = q
            err = (w - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        Wp[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scale, zero


@pytest.mark.parametrize("symmetric", [True, False])
def test_optimised_column_loop_is_the_textbook_loop_bit_for_bit(symmetric: bool) -> None:
    """The hot loop (transposed block, Python-float pivots, stacked columns) changes speed, not one bit."""
    W, H = _problem(3, k=256, out=96)
    scheme = WeightScheme(bits=4, strategy="group", group_size=64, symmetric=symmetric)
    options = RoundingOptions(order="gar", static_groups=False, mse_clip=True)
    res = gptq(W, H, scheme, F16_SCALES, options)
    codes, scale, zero = _textbook_gptq(W, H, scheme, F16_SCALES, options)
    assert torch.equal(res.qweight.scale.float(), scale)
    if not symmetric:
        assert torch.equal(res.qweight.zero, zero)
    assert torch.equal(res.qweight.codes.float(), codes)
