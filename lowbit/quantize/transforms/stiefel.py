"""Riemannian Adam on the orthogonal group (the square Stiefel manifold), for OSTQuant's learned rotations.

A rotation parameter ``X [..., n, n]`` (any leading batch shape: one matrix per KV head per layer) stays
orthogonal through training: each step takes the Euclidean gradient ``G``, projects it onto the tangent space at
``X`` (``grad = X skew(X^T G)``, the Riemannian gradient of the embedded metric), keeps Adam moments of it, and
moves along the manifold with a retraction:

* Cayley: ``X <- (I + a/2 W)^-1 (I - a/2 W) X`` with the skew ``W = (V X^T - X V^T) / 2`` built from the step
  ``V`` (``W X = V`` for a tangent ``V``, so the first-order move is ``-a V``); exactly orthogonal in exact
  arithmetic, one ``n x n`` solve per step;
* QR: ``X <- qf(X - a V)`` (the Q factor, with the signs of R's diagonal made positive so the map is continuous).

The first moment is carried to the new point by projecting it onto the new tangent space (vector transport by
projection). The second moment is ONE scalar per matrix (the squared norm of the Riemannian gradient), as
geoopt's RiemannianAdam keeps it for the Stiefel manifold: an elementwise second moment would bend the step out
of the tangent space. Every ``stabilize`` steps the point is re-orthonormalised by QR, to remove drift in float32
(parameters kept in float64 drift by ~1e-15 per step and need it rarely).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

RETRACTIONS = ("cayley", "qr")


def skew(A: torch.Tensor) -> torch.Tensor:
    """``(A - A^T) / 2`` over the last two dims."""
    return 0.5 * (A - A.transpose(-1, -2))


def project_tangent(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The tangent part of ``G`` at the orthogonal ``X`` (both ``[..., n, n]``): ``X skew(X^T G)``."""
    return X @ skew(X.transpose(-1, -2) @ G)


def qr_orthonormalize(A: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``A [..., n, n]`` with ``diag(R) > 0`` (the orthogonal matrix nearest in the QR sense)."""
    Q, R = torch.linalg.qr(A)
    d = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d[..., None, :]


def cayley_retract(X: torch.Tensor, V: torch.Tensor, a: float) -> torch.Tensor:
    """``X`` moved by ``-a V`` (``V`` tangent at ``X``) along the Cayley curve; orthogonal if ``X`` is."""
    W = 0.5 * (V @ X.transpose(-1, -2) - X @ V.transpose(-1, -2))  # skew, W X = V for a tangent V
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(eye + (a / 2) * W, (eye - (a / 2) * W) @ X)


def qr_retract(X: torch.Tensor, V: torch.Tensor, a: float) -> torch.Tensor:
    """``X`` moved by ``-a V`` then mapped back to the manifold by QR."""
    return qr_orthonormalize(X - a * V)


class StiefelAdam(torch.optim.Optimizer):
    """Riemannian Adam for square orthogonal parameters ``[..., n, n]`` (see the module docstring).

    Args:
        params: the orthogonal parameters (each must be orthogonal to start with).
        lr: the step size (a Frobenius length per step, since the step ``m / sqrt(v)`` has a norm near 1).
        betas, eps: Adam's.
        retraction: "cayley" or "qr".
        stabilize: re-orthonormalise every this many steps (0: never).
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        retraction: str = "cayley", stabilize: int = 10,
    ) -> None:
        if retraction not in RETRACTIONS:
            raise ValueError(f"retraction must be one of {RETRACTIONS}, got {retraction!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, retraction=retraction, stabilize=stabilize))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            retract = cayley_retract if group["retraction"] == "cayley" else qr_retract
            for X in group["params"]:
                if X.grad is None:
                    continue
                state = self.state[X]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(X)
                    state["v"] = torch.zeros(X.shape[:-2] + (1, 1), dtype=X.dtype, device=X.device)
                state["step"] += 1
                t = state["step"]
                rgrad = project_tangent(X, X.grad)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(rgrad, alpha=1 - b1)
                v.mul_(b2).add_(rgrad.pow(2).sum(dim=(-2, -1), keepdim=True), alpha=1 - b2)
                # bias-corrected direction; tangent at X because m is (moments are transported each step)
                direction = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                new = retract(X, direction, group["lr"])
                if group["stabilize"] and t % group["stabilize"] == 0:
                    new = qr_orthonormalize(new)
                X.copy_(new)
                m.copy_(project_tangent(X, m))
        return None


def orthogonality_error(X: torch.Tensor) -> float:
    """``max |X^T X - I|`` over every matrix of ``X [..., n, n]``."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return float((X.transpose(-1, -2) @ X - eye).abs().max())


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """Cosine decay from ``lr`` at step 0 to 0 after ``steps`` steps."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
