"""LR-QAT: low-rank adapters in the integer domain, merged into plain integer codes (ALGORITHMS.md 4).

The released method ``lr_qat_fixed_point8`` on a symmetric signed b-bit grid (per channel or per group):

1. range: per group, ``t = k absmax / 100`` (k = 1..100) minimising ``sum |w - Q_t(w)|^4`` (LP-4); ``s0 = t / qmax``;
2. base weights in units of ``s0``, as 8-bit fixed point with ``8 - b`` fractional bits:
   ``phi = round(clamp(W / s0, qmin, qmax) 2^(8-b))`` (int8), ``Phi = phi / 2^(8-b)``;
3. adapters ``A [out, r]`` (zeros) and ``B [r, in]`` (Kaiming uniform, a = sqrt(5)); ``Z = Phi + (alpha / r) A B``;
4. forward: ``W_hat = s clamp(round_ste(Z), qmin, qmax)``, with ``s`` a trained scale starting at ``s0``;
5. merge: codes ``clamp(round(Z), qmin, qmax)`` and scale ``s``, stored in the recipe's scale dtype.

Our one change: a fixed-point value that lands exactly on a half step (``Phi = k + 1/2``, where round-half-to-even
may pick the other code than RTN did; ALGORITHMS.md 4.3) is moved by 2^-(8-b) toward RTN's code, so that with no
training the merge is exactly RTN on the LP-4 range. The forward uses the scale rounded to its storage dtype
(straight-through), so the merged layer computes exactly what the last training forward computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.formats.grid import compute_params, round_values
from lowbit.formats.int import _store, expand_groups, mse_clip, round_ste
from lowbit.formats.precision import Precision
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quantize.finetune import Settings, Start, Switch, TrainedLinear, Trainer, register_trainer
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.rounding import RoundResult, register_rounder
from lowbit.quantize.rtn import from_values, grid_positions

LP_NORM = 4.0
LP_CANDIDATES = 100  # t_k = k absmax / 100, k = 1..100


def lp_range(W: torch.Tensor, scheme: WeightScheme, precision: Precision = Precision()) -> torch.Tensor:
    """LP-4 range shrink factor per group of ``W [out, in]`` (``t / absmax``, float32 ``[out, G]``): the candidate
    ``k / 100`` minimising ``sum |w - Q(w)|^4``, the smallest shrink winning a tie."""
    return mse_clip(W, scheme, precision, grid=LP_CANDIDATES, max_shrink=1.0, norm=LP_NORM)


@register_rounder("lrqat", needs_hessian=False)
def lrqat_start(
    W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, precision: Precision = Precision(),
    options: RoundingOptions | None = None,
) -> RoundResult:
    """LR-QAT's start: RTN of ``W [out, in]`` on the LP-4 range (symmetric int grids), with the positions
    ``W / s0``; the adapters are trained afterwards (finetune.py)."""
    scheme = scheme.for_layer(W.shape[1])
    if not (scheme.is_plain_int and scheme.symmetric):
        raise ValueError(f"LR-QAT needs a symmetric int grid with float scales, not {scheme.name}")
    params = compute_params(W, scheme, precision.scale_dtype, lp_range(W, scheme, precision))
    qw = from_values(round_values(W, params, scheme, W.shape[1]), params, scheme, precision)
    return RoundResult(qw, positions=grid_positions(W, qw))


def fixed_point(phi0: torch.Tensor, codes: torch.Tensor, bits: int, qmin: int, qmax: int) -> torch.Tensor:
    """int8 ``round(clamp(phi0, qmin, qmax) 2^(8 - bits))`` for ``phi0`` float32 ``[out, in]`` (weights in units of
    ``s0``), with exact half steps moved one unit toward ``codes`` (RTN's, int8 ``[out, in]``)."""
    frac = 8 - bits
    phi = torch.round(phi0.clamp(qmin, qmax) * 2.0**frac)
    if frac > 0:
        half = 2.0 ** (frac - 1)
        tie = torch.remainder(phi, 2.0**frac) == half  # Phi = k + 1/2 exactly
        phi = torch.where(tie, phi + torch.sign(codes.float() * 2.0**frac - phi), phi)
    return phi.clamp(-128, 127).to(torch.int8)


class LrQatLinear(TrainedLinear):
    """The twin of one QuantLinear: ``W_hat = s clamp(round_ste(phi / 2^(8-b) + alpha / r A B), qmin, qmax)``.

    ``phi`` int8 ``[out, in]`` (buffer), ``A`` float32 ``[out, r]``, ``B`` float32 ``[r, in]``, ``s`` float32 ``[out, G]``
    (parameters). The weight and the product run under activation checkpointing (recomputed in the backward pass).
    """

    def __init__(self, ql: QuantLinear, start: Start, switch: Switch, rank: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__(ql, start, switch)
        qw, p = start.result.qweight, start.result.positions
        if p is None or qw.zero is not None or not qw.scheme.is_plain_int:
            raise ValueError("LR-QAT needs a symmetric int start with positions (quantize/lrqat.py lrqat_start)")
        scheme = qw.scheme
        self.frac = 8 - scheme.bits
        self.register_buffer("phi", fixed_point(p, qw.codes, scheme.bits, scheme.qmin, scheme.qmax), persistent=False)
        out_f, in_f = qw.shape
        self.A = nn.Parameter(torch.zeros(out_f, rank))
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) of a [rank, in] weight
        self.B = nn.Parameter((torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound)
        self.s = nn.Parameter(qw.scale.float().clone())
        self.scaling = alpha / rank

    def integers(self) -> torch.Tensor:
        """``Z = Phi + alpha / r A B``, float32 ``[out, in]``."""
        return self.phi.float() / 2.0**self.frac + self.scaling * (self.A @ self.B)

    def _scale(self) -> torch.Tensor:
        """``s`` rounded to the scale storage dtype (straight-through), float32 ``[out, G]``."""
        stored = _store(self.s.detach(), self.qweight.precision.scale_dtype)
        return self.s + (stored - self.s).detach()

    def student_weight(self) -> torch.Tensor:
        s = self.qweight.scheme
        w_int = round_ste(self.integers()).clamp(s.qmin, s.qmax)
        return w_int * expand_groups(self._scale(), w_int.shape[1])

    def student(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(super().student, x, use_reentrant=False)
        return super().student(x)

    def merged(self) -> QuantizedWeight:
        s = self.qweight.scheme
        with torch.no_grad():
            codes = torch.round(self.integers()).clamp(s.qmin, s.qmax).to(torch.int8).cpu()
            scale = _store(self.s.detach(), self.qweight.precision.scale_dtype).cpu()
        return QuantizedWeight(codes, scale, None, s, self.qweight.precision)


class LrQatTrainer(Trainer):
    """LR-QAT's variables: AdamW (beta2 0.95, no weight decay) on A and B at ``lr`` and on the scales at
    ``scale_lr``, gradients clipped to norm 1, linear decay after the warm-up.

    Device defaults: on a GPU the released README's setting (10 000 steps of 32 windows of 1024 tokens, 1 000
    warm-up, lr 1e-3 for A and B, 1e-5 for the scales, next-token cross-entropy); on 2 CPU cores a short
    distillation (KL to the float model, which carries more per token than the labels) with learning rates
    raised so that A B moves the integers within that many steps (BENCHMARKS.md, issue 16).
    """

    name = "lrqat"
    cpu = {"steps": 48, "batch": 2, "seqlen": 512, "lr": 0.05, "scale_lr": 1e-5, "warmup": 4, "loss": "kl",
           "rho": 1.0, "clamp": 1.0, "weight_decay": 0.0, "schedule": "linear"}
    cuda = {"steps": 10000, "batch": 32, "seqlen": 1024, "lr": 1e-3, "scale_lr": 1e-5, "warmup": 1000, "loss": "ce",
            "rho": 1.0, "clamp": 1.0, "weight_decay": 0.0, "schedule": "linear"}
    max_grad_norm = 1.0

    def wrap(self, ql: QuantLinear, start: Start, switch: Switch, s: Settings, generator: torch.Generator) -> TrainedLinear:
        return LrQatLinear(ql, start, switch, s.rank, s.alpha, generator)

    def _params(self, twins: list[TrainedLinear]) -> list[nn.Parameter]:
        return [p for t in twins for p in t.parameters() if p.requires_grad]

    def optimizer(self, twins: list[TrainedLinear], s: Settings) -> torch.optim.Optimizer:
        ab = [p for t in twins if isinstance(t, LrQatLinear) for p in (t.A, t.B)]
        scales = [t.s for t in twins if isinstance(t, LrQatLinear)]
        groups: list[dict[str, Any]] = [{"params": ab, "lr": s.lr, "weight_decay": s.weight_decay}]
        if s.scale_lr > 0:
            groups.append({"params": scales, "lr": s.scale_lr, "weight_decay": 0.0})
        else:
            for p in scales:
                p.requires_grad_(False)
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=s.weight_decay)

    def before_step(self, twins: list[TrainedLinear], s: Settings) -> None:
        torch.nn.utils.clip_grad_norm_(self._params(twins), self.max_grad_norm)


register_trainer(LrQatTrainer())
