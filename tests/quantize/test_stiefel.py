"""The Riemannian optimizer keeps rotations orthogonal and descends."""

import pytest
import torch

from lowbit.quantize.transforms.stiefel import (
    StiefelAdam, cayley_retract, orthogonality_error, project_tangent, qr_orthonormalize, qr_retract,
)


def _random_orthogonal(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return qr_orthonormalize(torch.randn(*shape, generator=g, dtype=torch.float64))


def test_projection_is_tangent_and_idempotent() -> None:
    X = _random_orthogonal(3, 16, 16)
    G = torch.randn(3, 16, 16, dtype=torch.float64)
    V = project_tangent(X, G)
    A = X.transpose(-1, -2) @ V
    assert torch.allclose(A, -A.transpose(-1, -2), atol=1e-12)  # X^T V skew: tangent
    assert torch.allclose(project_tangent(X, V), V, atol=1e-12)


@pytest.mark.parametrize("retract", [cayley_retract, qr_retract])
def test_retractions_stay_orthogonal_and_move_first_order_along_the_step(retract) -> None:  # type: ignore[no-untyped-def]
    X = _random_orthogonal(2, 12, 12, seed=1)
    V = project_tangent(X, torch.randn(2, 12, 12, dtype=torch.float64))
    for a in (1e-4, 0.1, 1.0):
        assert orthogonality_error(retract(X, V, a)) < 1e-12
    a = 1e-4
    assert torch.allclose((retract(X, V, a) - X) / a, -V, atol=1e-3)


@pytest.mark.parametrize("retraction", ["cayley", "qr"])
def test_stiefel_adam_finds_a_target_rotation(retraction: str) -> None:
    """Minimise ``|X - Q|^2`` over rotations: the optimum is Q itself."""
    torch.manual_seed(0)
    Q = _random_orthogonal(8, 8, seed=2)
    X = torch.nn.Parameter(_random_orthogonal(8, 8, seed=3))
    opt = StiefelAdam([X], lr=0.05, retraction=retraction)
    start = float((X - Q).pow(2).sum())
    for _ in range(300):
        opt.zero_grad()
        (X - Q).pow(2).sum().backward()
        opt.step()
    assert orthogonality_error(X.detach()) < 1e-10
    # det(X) is +-1 and constant along the path: reach Q if they share it, else the nearest rotation of that sign
    end = float((X - Q).pow(2).sum())
    assert end < 0.2 * start


def test_bad_retraction_is_refused() -> None:
    with pytest.raises(ValueError, match="retraction"):
        StiefelAdam([torch.nn.Parameter(torch.eye(2))], lr=0.1, retraction="exp")
