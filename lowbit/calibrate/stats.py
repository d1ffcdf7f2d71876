"""Per-linear input statistics accumulated over every calibration token."""

from __future__ import annotations

import torch


class InputStats:
    """Accumulates the Hessian proxy ``X^T X`` and the per-channel absmax of a linear's input.

    ``H`` is kept as a float32 sum on the input's device and normalised on read:
    ``hessian() = X^T X / n_tokens`` (``[in, in]`` float32), the mean outer product over all tokens.
    """

    def __init__(self, in_features: int, device: torch.device | str, hessian: bool = True) -> None:
        self.in_features = in_features
        self.n_tokens = 0
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x [..., in]`` (any float dtype)."""
        X = x.reshape(-1, self.in_features).float()  # [tokens, in]
        self.n_tokens += X.shape[0]
        self.absmax = torch.maximum(self.absmax, X.abs().amax(dim=0))
        if self._H is not None:
            self._H.addmm_(X.t(), X)

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` over every token seen, float32 ``[in, in]``."""
        if self._H is None:
            raise RuntimeError("this accumulator was created without a Hessian")
        return self._H / max(self.n_tokens, 1)


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||X (W - W_hat)^T||_F / ||X W^T||_F`` from ``H = X^T X / n``: sqrt(tr(dW H dW^T) / tr(W H W^T)).

    W, W_hat: ``[out, in]``; H: float32 ``[in, in]``.
    """
    W = W.float()
    dW = W - W_hat.float()
    num = torch.einsum("oi,ij,oj->", dW, H, dW).clamp_min(0.0)
    den = torch.einsum("oi,ij,oj->", W, H, W).clamp_min(1e-30)
    return float((num / den).sqrt())
