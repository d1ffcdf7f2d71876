"""Hadamard matrices (Sylvester, Paley I/II, Kronecker) and their fast application, against dense products."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import (
    HadamardTransform,
    _paley1,
    _paley2,
    apply_hadamard,
    block_hadamard,
    core_matrix,
    hadamard_core,
    hadamard_matrix,
    has_hadamard,
    random_signs,
)

SIZES = (1, 2, 4, 12, 20, 28, 36, 64, 576, 1536, 768, 2048, 44)
BF16_ULP = 2.0**-8  # relative spacing of bfloat16 (8 significand bits)


def _x(n: int, rows: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float ``[2, rows // 2, n]`` standard-normal batch (two batch dims, to check reshaping)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, rows // 2, n, generator=g).to(dtype)


def _dense(n: int, signs: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """The float64 ``[n, n]`` matrix ``diag(signs) @ H`` (or its transpose)."""
    m = hadamard_matrix(n)
    if signs is not None:
        m = signs.to(torch.float64)[:, None] * m
    return m.T if transpose else m


# ---- construction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal_with_entries_pm_inv_sqrt_n(n: int) -> None:
    h64 = hadamard_matrix(n)
    h = hadamard_matrix(n, torch.float32)
    assert h.shape == (n, n) and h.dtype == torch.float32
    assert torch.equal(h, h64.to(torch.float32))
    # The float32 matrix itself is orthonormal to 1e-6 (products taken exactly, in float64, so that a float32
    # matmul's accumulation error over n terms is not what is measured) ...
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(h.double() @ h.double().T, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(h64 @ h64.T, eye, atol=1e-12, rtol=0)
    # ... and a float32 matmul stays within its accumulation error.
    torch.testing.assert_close(h @ h.T, eye.float(), atol=1e-5, rtol=0)
    assert torch.equal(h.abs(), torch.full((n, n), 1 / math.sqrt(n)).to(torch.float32))
    torch.testing.assert_close(h64.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-15, rtol=0)


def test_decompositions_prefer_the_largest_power_of_two() -> None:
    assert hadamard_core(1) == (1, 1)
    assert hadamard_core(2) == (1, 2)
    assert hadamard_core(64) == (1, 64)
    assert hadamard_core(576) == (36, 16)
    assert hadamard_core(1536) == (12, 128)
    assert hadamard_core(768) == (12, 64)
    assert hadamard_core(44) == (44, 1)
    assert hadamard_core(28) == (28, 1)


def test_matrix_is_the_kronecker_of_core_and_sylvester() -> None:
    h = hadamard_matrix(24) * math.sqrt(24)
    s2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(h, torch.kron(core_matrix(12), s2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43])
def test_paley_one(q: int) -> None:
    h = _paley1(q).to(torch.float64)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))


@pytest.mark.parametrize("q", [5, 13, 17, 29])
def test_paley_two(q: int) -> None:
    h = _paley2(q).to(torch.float64)
    k = 2 * (q + 1)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


def test_cached_core_is_not_shared() -> None:
    core = core_matrix(12)
    core.zero_()
    assert core_matrix(12).abs().min() == 1


@pytest.mark.parametrize("n", [9, 6, 10, 3, 172, 0, -4])
def test_no_construction(n: int) -> None:
    assert not has_hadamard(n)
    assert hadamard_core(n) is None


def test_missing_order_raises_naming_it() -> None:
    with pytest.raises(LowbitError, match=r"\b9\b") as err:
        hadamard_matrix(9)
    assert "\n" not in str(err.value)
    with pytest.raises(LowbitError, match=r"\b6\b"):
        apply_hadamard(torch.ones(2, 6))


def test_bad_inputs_raise() -> None:
    with pytest.raises(LowbitError):
        apply_hadamard(torch.ones(2, 8), n=16)
    with pytest.raises(LowbitError):
        apply_hadamard(torch.ones(2, 8), signs=torch.ones(4))
    with pytest.raises(LowbitError):
        apply_hadamard(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(LowbitError):
        block_hadamard(torch.ones(2, 10), 4)
    with pytest.raises(LowbitError):
        HadamardTransform(9)


def test_random_signs_deterministic() -> None:
    a = random_signs(256, seed=3)
    assert a.dtype == torch.float64 and a.shape == (256,)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, random_signs(256, seed=3))
    assert not torch.equal(a, random_signs(256, seed=4))


# ---- fast application --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_apply_matches_dense_float32(n: int, with_signs: bool, transpose: bool) -> None:
    x = _x(n)
    signs = random_signs(n, seed=n) if with_signs else None
    out = apply_hadamard(x, n, signs, transpose)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = (x.to(torch.float64) @ _dense(n, signs, transpose)).to(torch.float32)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_apply_matches_dense_bfloat16(n: int, with_signs: bool, transpose: bool) -> None:
    x = _x(n, dtype=torch.bfloat16)
    signs = random_signs(n, seed=n + 1) if with_signs else None
    out = apply_hadamard(x, n, signs, transpose)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    ref = (x.to(torch.float32) @ _dense(n, signs, transpose).to(torch.float32)).to(torch.bfloat16)
    # Both round a float32 value to bf16; they may land one ulp apart. Outputs are ~N(0, 1).
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-3, rtol=2 * BF16_ULP)


def test_apply_matches_dense_float64() -> None:
    x = _x(576, dtype=torch.float64)
    out = apply_hadamard(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ hadamard_matrix(576), atol=1e-12, rtol=0)


@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_transpose_inverts(n: int, with_signs: bool) -> None:
    x = _x(n)
    signs = random_signs(n, seed=7) if with_signs else None
    back = apply_hadamard(apply_hadamard(x, n, signs), n, signs, transpose=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    there = apply_hadamard(apply_hadamard(x, n, signs, transpose=True), n, signs)
    torch.testing.assert_close(there, x, atol=1e-5, rtol=1e-5)


def test_default_order_is_last_dim_and_1d_inputs_work() -> None:
    x = _x(12)[0, 0]
    torch.testing.assert_close(apply_hadamard(x), apply_hadamard(x[None], 12)[0])


# ---- module and block form ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", [12, 64, 576])
def test_transform_dense_matches_forward(n: int, transpose: bool) -> None:
    t = HadamardTransform(n, random_signs(n, seed=1), transpose=transpose)
    assert t.signs is not None and t.signs.dtype == torch.float32 and "signs" in dict(t.named_buffers())
    assert f"n={n}" in repr(t)
    m = t.dense()
    assert m.shape == (n, n) and m.dtype == torch.float32
    x = _x(n)
    torch.testing.assert_close(t(x), x @ m, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(m, _dense(n, t.signs, transpose).to(torch.float32), atol=1e-7, rtol=0)


def test_transform_without_signs_state_dict_round_trip() -> None:
    t = HadamardTransform(20)
    assert t.signs is None
    torch.testing.assert_close(t.dense(), hadamard_matrix(20, torch.float32))
    u = HadamardTransform(20, random_signs(20, 2))
    v = HadamardTransform(20, torch.ones(20))
    v.load_state_dict(u.state_dict())
    torch.testing.assert_close(v.dense(), u.dense())


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("signs_len", [0, 1, 4])  # none, one [block] shared, one per channel [d]
@pytest.mark.parametrize("block", [4, 12, 64])
def test_block_hadamard_matches_block_diagonal(block: int, signs_len: int, transpose: bool) -> None:
    heads = 4
    d = heads * block
    signs = None if signs_len == 0 else random_signs(block * signs_len, seed=block)
    per_channel = None if signs is None else signs.repeat(heads // signs_len)
    h = hadamard_matrix(block)
    dense = torch.block_diag(*[h] * heads)
    if per_channel is not None:
        dense = per_channel[:, None] * dense
    if transpose:
        dense = dense.T
    x = _x(d)
    out = block_hadamard(x, block, signs, transpose)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, (x.to(torch.float64) @ dense).to(torch.float32), atol=2e-5, rtol=1e-5)


def test_block_hadamard_is_differentiable() -> None:
    """Training through an online rotation (OSTQuant simulates R4): the gradient is ``g H^T``, the values unchanged."""
    torch.manual_seed(0)
    x = torch.randn(3, 1536, dtype=torch.float64, requires_grad=True)
    signs = random_signs(1536, 1)
    y = block_hadamard(x, 1536, signs)
    assert torch.allclose(y, block_hadamard(x.detach(), 1536, signs), atol=1e-12)
    g = torch.randn(3, 1536, dtype=torch.float64)
    (y * g).sum().backward()
    M = signs.double()[:, None] * hadamard_matrix(1536, torch.float64)
    assert torch.allclose(x.grad, g @ M.T, atol=1e-10)
