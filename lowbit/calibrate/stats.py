"""Per-linear input statistics accumulated over every calibration token."""

from __future__ import annotations

import contextlib

import torch

from lowbit.distributed import all_reduce


# X^T X is symmetric: only its lower block triangle is accumulated, as row blocks of about TRI_BLOCK columns
# (each row block i one GEMM X_i^T X[:, :end_i]), and mirrored on read: on the CPU that costs clearly less than
# the full product (BENCHMARKS.md, 2026-11-28, code of 92d95fb); blocks much narrower than ~96 columns run the
# GEMMs below their peak.
TRI_BLOCK = 96
TRI_MAX_BLOCKS = 6


def triangle_blocks(d: int) -> list[int]:
    """Row-block boundaries ``[0, e_1, ..., d]`` for a ``d x d`` lower triangle (multiples of 16 inside)."""
    n = max(1, min(TRI_MAX_BLOCKS, d // TRI_BLOCK))
    step = -(-d // n)
    step = -(-step // 16) * 16
    return sorted({0, d, *range(step, d, step)})


def exact_math() -> contextlib.ExitStack:
    """A context with autocast off (``--calib-dtype bfloat16`` runs the forward passes under it): statistics,
    rounding and errors are computed in float32 whatever the calibration dtype."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


class InputStats:
    """Accumulates the Hessian proxy ``X^T X`` and, if asked, the per-channel absmax of a linear's input.

    ``H`` is kept as a float64 sum of each batch's float32 ``X^T X`` on the input's device (so the sum hardly depends
    on its order: the same bits whether the batches are summed in one process or split among several and
    all-reduced, lowbit/distributed.py), lower block triangle only (:func:`triangle_blocks`; the strictly upper
    part of the buffer outside the diagonal blocks stays zero), and is mirrored and normalised on read: ``hessian() = X^T X / n_tokens`` (``[in, in]`` float32, exactly symmetric), the mean
    outer product over all tokens. ``absmax`` (float32 ``[in]``, or None unless ``absmax=True``) is
    ``max |x|`` per input channel, for scalings such as SmoothQuant's; GPTQ and BAQ do not read it, and its
    two reductions cost time in every block (BENCHMARKS.md, 2026-11-29, code of 06cb03f), so it is off by default.
    """

    def __init__(self, in_features: int, device: torch.device | str, hessian: bool = True, absmax: bool = False) -> None:
        self.in_features = in_features
        self.n_tokens = 0
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device) if absmax else None
        self._H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None
        self._blocks = triangle_blocks(in_features)
        self._P: torch.Tensor | None = None  # one row block's float32 product: [rows of the widest block, in]

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x [..., in]`` (any float dtype)."""
        with exact_math():
            self._add(x.reshape(-1, self.in_features).float())  # [tokens, in]

    def _add(self, X: torch.Tensor) -> None:
        self.n_tokens += X.shape[0]
        if self.absmax is not None:
            # max(amax, -amin): two reductions without X.abs()'s [tokens, in] temporary
            self.absmax = torch.maximum(self.absmax, torch.maximum(X.amax(dim=0), X.amin(dim=0).neg_()))
        if self._H is not None:
            if self._P is None:
                rows = max(e - b for b, e in zip(self._blocks[:-1], self._blocks[1:]))
                self._P = torch.empty(rows, self.in_features, dtype=torch.float32, device=self._H.device)
            for start, end in zip(self._blocks[:-1], self._blocks[1:]):
                P = self._P[: end - start, :end]
                P.addmm_(X[:, start:end].t(), X[:, :end], beta=0)  # this batch's product, float32
                self._H[start:end, :end].add_(P)

    def release(self) -> None:
        """Drop the accumulated sums (once the Hessian has been read for the last time): memory for the next one."""
        self._H, self._P = None, None

    def all_reduce(self) -> None:
        """Sum ``H`` and the token count, and max ``absmax``, over the processes of a distributed run (no-op alone)."""
        if self._H is not None:
            all_reduce(self._H)
        device = self._H.device if self._H is not None else (self.absmax.device if self.absmax is not None else "cpu")
        n = all_reduce(torch.tensor([self.n_tokens], dtype=torch.float64, device=device))  # NCCL: a GPU tensor
        self.n_tokens = int(n.item())
        if self.absmax is not None:
            all_reduce(self.absmax, "max")

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` over every token seen, float32 ``[in, in]``."""
        if self._H is None:
            raise RuntimeError("this accumulator was created without a Hessian")
        self._P = None  # the per-batch scratch: made again if more batches come
        # One [in, in] copy: each strictly-lower block is mirrored into the upper part, each diagonal block
        # (a full GEMM, symmetric up to round-off) takes its lower triangle on both sides.
        H = self._H.to(torch.float32)
        for start, end in zip(self._blocks[:-1], self._blocks[1:]):
            D = H[start:end, start:end]
            D.copy_(D.tril() + D.tril(-1).mT)
            H[:start, start:end].copy_(H[start:end, :start].mT)
        return H.div_(max(self.n_tokens, 1))


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||X (W - W_hat)^T||_F / ||X W^T||_F`` from ``H = X^T X / n``: sqrt(tr(dW H dW^T) / tr(W H W^T)).

    W, W_hat: ``[out, in]``; H: float32 ``[in, in]``.
    """
    W = W.float()
    dW = W - W_hat.float()
    num = torch.einsum("oi,ij,oj->", dW, H, dW).clamp_min(0.0)
    den = torch.einsum("oi,ij,oj->", W, H, W).clamp_min(1e-30)
    return float((num / den).sqrt())
