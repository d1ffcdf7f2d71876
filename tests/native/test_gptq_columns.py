"""GPTQ's column loop in C (native/gptq_columns.py) gives the torch loop's bits; the build falls back cleanly."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.grid import compute_params
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit import native
from lowbit.native import gptq_columns
from lowbit.quantize import gptq as G
from lowbit.quantize.options import RoundingOptions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # model dtypes: dequantized values are rounded to them
# (model dtype, scale dtype): float32 models with float32 or float16 scales, 16-bit models with their own
PRECISIONS = [Precision(), Precision(torch.float32, torch.float16), Precision(torch.float16, torch.float16),
              Precision(torch.bfloat16, torch.bfloat16)]


def _problem(seed: int, out: int, k: int = 192, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs (as in real activations), their Hessian proxy and a weight ``[out, k]``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = (torch.randn(n, k, generator=g) * torch.rand(k, generator=g) * 3) @ mix
    return torch.randn(out, k, generator=g), X.T @ X / n


def test_the_kernel_builds_here() -> None:
    """This project's machines have a C compiler: the fast loop must be what runs, not the fallback."""
    assert gptq_columns.available(torch.float16)


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: f"{p.dtype}-{p.scale_dtype}")
@pytest.mark.parametrize(
    ("scheme", "options"),
    [
        (WeightScheme(bits=4, strategy="group", group_size=64), RoundingOptions(order="gar", static_groups=False, mse_clip=True)),
        (WeightScheme(bits=3, strategy="group", group_size=32, symmetric=False), RoundingOptions(order="gar", static_groups=False)),
        (WeightScheme(bits=4, strategy="group", group_size=64, symmetric=False), RoundingOptions()),
        (WeightScheme(bits=2, strategy="channel", group_size=None, symmetric=False), RoundingOptions(order="natural", block_size=16)),
        (WeightScheme(bits=8, strategy="tensor", group_size=None), RoundingOptions()),
        (WeightScheme(bits=4, strategy="tensor", group_size=None, symmetric=False), RoundingOptions()),
    ],
    ids=["4b-g64-gar-mse", "3b-g32-asym-gar", "4b-g64-asym-actorder-static", "2b-channel-asym", "8b-tensor",
         "4b-tensor-asym"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_loop_equals_torch_loop_bit_for_bit(
    scheme: WeightScheme, options: RoundingOptions, precision: Precision, threads: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Codes, scales, zero points and row losses identical; 600 rows split across threads off the 16-row grain."""
    W, H = _problem(5, out=600)
    scheme = scheme.for_layer(W.shape[1])
    gs = scheme.columns_per_scale(W.shape[1]) if scheme.strategy != "tensor" else W.shape[1]
    perm = G.column_order(H.diagonal(), gs, options.order)
    U, _ = G.inverse_hessian_factor(H[perm][:, perm], options.damp)
    static = options.static_groups or scheme.strategy != "group"
    params = compute_params(W, scheme, precision.scale_dtype, 1.0) if static else None
    ref = G._column_loop(W.clone(), U, perm, scheme, precision, options, params, threads, native_loop=False, residual=True)

    def no_torch_loop(*args: object) -> None:
        raise AssertionError("the torch loop ran instead of the C one")

    monkeypatch.setattr(G, "_block_torch", no_torch_loop)
    out = G._column_loop(W.clone(), U, perm, scheme, precision, options, params, threads, native_loop=True, residual=True)
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1].scale, ref[1].scale)
    assert (out[1].zero is None) == (ref[1].zero is None)
    if ref[1].zero is not None:
        assert torch.equal(out[1].zero, ref[1].zero)
    assert torch.equal(out[2], ref[2])
    assert torch.equal(out[3], ref[3])


def _tie_points(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Float32 values exactly halfway between neighbouring ``dtype`` values (normal and subnormal)."""
    finfo = torch.finfo(dtype)
    a = (torch.rand(n, generator=g) * 2 - 1) * torch.exp2(torch.randint(-26, 16, (n,), generator=g).float())
    a = a.clamp(-finfo.max / 2, finfo.max / 2).to(dtype)
    b = torch.nextafter(a.float().to(dtype), torch.full_like(a, float("inf"))).to(dtype)  # next value up
    return (a.float() + b.float()) / 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequantized_values_round_like_torch(dtype: torch.dtype) -> None:
    """The C rounding of ``q * s`` to the model dtype equals torch's ``.to(dtype)``: ties, subnormals, overflow."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    s = torch.exp2(torch.rand(n, generator=g) * 70 - 45)  # 2^-45 .. 2^25: subnormal to overflow in float16
    q = torch.randint(-8, 8, (n,), generator=g).float()
    s = torch.cat([s, _tie_points(dtype, n, g).abs().clamp_min(1e-30), torch.tensor([65504.0, 65520.0, 3e38])])
    q = torch.cat([q, torch.ones(n), torch.tensor([1.0, 1.0, 7.0])])
    w = q * s  # round(w / s) gives this q back (|q| <= 8)
    W1T, U1 = w[None].clone(), torch.ones(1, 1)
    Q, E = torch.empty_like(W1T), torch.empty_like(W1T)
    gptq_columns.gptq_columns(W1T, U1, 0, 1, s.contiguous(), None, -8.0, 7.0, dtype, Q, E)
    assert torch.equal(Q[0], q)
    expected = w - (q * s).to(dtype).float()  # inf - inf where the product overflows: nan in both
    assert bool(((E[0] == expected) | (E[0].isnan() & expected.isnan())).all())
    assert bool(expected.isinf().any() or expected.isnan().any())  # the overflow was exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_special_values_round_like_torch(dtype: torch.dtype) -> None:
    """``w / s`` exactly halfway between integers (ties to even), signed zeros, inf and nan, with a zero point."""
    k = torch.arange(-12, 12).float()
    w = torch.cat([k + 0.5, k, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e30, -1e30])])
    s = torch.full_like(w, 1.0).mul_(torch.tensor(0.25).to(dtype).float())  # a power of two: w * s exact
    w = w * s
    rows = w.numel()
    z = torch.full_like(w, 3.0)
    for zero in (None, z):
        W1T, U1 = w[None].clone(), torch.ones(1, 1)
        Q, E = torch.empty_like(W1T), torch.empty_like(W1T)
        gptq_columns.gptq_columns(W1T, U1, 0, 1, s, zero, -8.0, 7.0, dtype, Q, E)
        q = torch.div(w, s).round()
        if zero is not None:
            q = q + zero
        q = q.clamp(-8, 7)
        dq = ((q if zero is None else q - zero) * s).to(dtype).float()
        same = lambda a, b: bool(((a == b) | (a.isnan() & b.isnan())).all())  # noqa: E731 - -0 == 0: the sign of a zero may differ
        assert same(Q[0], q) and same(E[0], w - dq), rows


def test_switched_off_or_without_compiler_gptq_runs_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOWBIT_NATIVE=0`` or no C compiler: no kernel, and GPTQ gives the same result through torch."""
    W, H = _problem(1, out=64, k=128)
    scheme = WeightScheme(bits=4, strategy="group", group_size=32)
    options = RoundingOptions(order="gar", static_groups=False, mse_clip=True)
    fast = G.gptq(W, H, scheme, Precision(torch.float32, torch.float16), options)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert native.load("gptq_columns") is None and not gptq_columns.available(torch.float16)
    slow = G.gptq(W, H, scheme, Precision(torch.float32, torch.float16), options)
    assert torch.equal(fast.qweight.codes, slow.qweight.codes) and torch.equal(fast.qweight.scale, slow.qweight.scale)
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.load("gptq_columns") is None


def test_a_compiler_command_with_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``CC`` may carry arguments ("ccache gcc", "gcc -m64"): the command is split, not looked up whole."""
    cc = native._compiler()
    assert cc is not None
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{cc[0]} -Wall")
    assert native._compiler() == (cc[0], "-Wall")
    assert native.load("gptq_columns") is not None


def test_a_build_failure_is_no_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A source that does not compile gives None (and leaves nothing half-written in the cache)."""
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "broken.c").write_text("this is not C\n")
    assert native.load("broken") is None
    assert "error" in native.BUILD_ERRORS["broken"]  # the compiler's message is kept for whoever debugs it
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_wrong_inputs_are_refused() -> None:
    W1T, U1 = torch.zeros(4, 32), torch.eye(4)
    Q, E = torch.empty_like(W1T), torch.empty_like(W1T)
    with pytest.raises(ValueError, match="contiguous float32"):
        gptq_columns.gptq_columns(W1T.double(), U1, 0, 4, torch.ones(32), None, -8, 7, torch.float16, Q, E)
    with pytest.raises(ValueError, match="shapes"):
        gptq_columns.gptq_columns(W1T, torch.eye(3), 0, 4, torch.ones(32), None, -8, 7, torch.float16, Q, E)
    with pytest.raises(ValueError, match="shapes"):  # one scale row per block column, not fewer
        gptq_columns.gptq_columns(W1T, U1, 0, 4, torch.ones(2, 32), None, -8, 7, torch.float16, Q, E)
    with pytest.raises(ValueError, match="outside"):
        gptq_columns.gptq_columns(W1T, U1, 0, 5, torch.ones(32), None, -8, 7, torch.float16, Q, E)
    with pytest.raises(ValueError, match="contiguous float32"):
        gptq_columns.gptq_columns(W1T, U1, 0, 4, torch.ones(64)[::2], None, -8, 7, torch.float16, Q, E)
