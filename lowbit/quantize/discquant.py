"""DiscQuant: each weight's rounding decided by the model's output distribution (ALGORITHMS.md 5).

On the grid of the starting rounding (GPTQ, or RTN with clipping; any plain int scheme) every weight has two
candidate codes, ``down`` and ``up = down + 1``, and one interpolation variable ``x`` in [0, 1]:

    W(x) = s (down + x - z)            (s, z: its group's scale and zero point; codes include z)

``y``, the weight's position between its two codes (from the starting rounding's positions,
quantize/rounding.py), defines the linear rounding term ``-<c, x>``, ``c = 2 y - 1``. ``x`` starts at ``round(y)``
(the starting rounding itself: our default, so a GPTQ start is refined rather than relaxed to its compensated
weights), at ``y`` (the released code's ``orig``) or uniformly at random (its default). Training minimises ``KL(p_float || p_x) / delta^2`` (finetune.py), with
``delta^2`` the mean over layers of ``12 mean((W_start - W)^2)``, the squared step of uniform rounding noise. As in
the released code the rounding term acts on the gradient:

    x.grad <- -c + clamp(rho * dKL/dx / delta^2, -clamp, clamp)

then AdamW (weight decay 0.01 by default), then ``x <- clamp(x, 0, 1)``. The codes are ``down + round(x)`` (a tie
goes down): with no step and the "start" or "position" init, exactly the starting rounding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowbit.formats.int import expand_groups, quantize_codes
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quantize.finetune import Settings, Start, Switch, TrainedLinear, Trainer, register_trainer
from lowbit.quantize.gptq import gptq
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.rounding import RoundResult, register_rounder
from lowbit.quantize.rtn import rtn


@register_rounder("disc", needs_hessian=True)
def disc_start(
    W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, precision: Precision = Precision(),
    options: RoundingOptions | None = None,
) -> RoundResult:
    """DiscQuant's starting rounding of ``W [out, in]``: GPTQ (``options.start == "gptq"``, needs ``H``) or RTN with
    the options' clipping; the model-level training (finetune.py) then decides each code between its two grid
    neighbours."""
    options = options or RoundingOptions()
    if options.start == "rtn":
        return rtn(W, None, scheme, precision, options, positions=True)
    return gptq(W, H, scheme, precision, options, positions=True)


class DiscLinear(TrainedLinear):
    """The twin of one QuantLinear: ``W(x) = s (down + x - z)`` with ``x`` bfloat16 ``[out, in]`` in [0, 1] (as in
    the released code; its AdamW states take its dtype, so x and its two moments cost 6 bytes a weight, not 12).

    Buffers: ``down`` int8 ``[out, in]`` (the lower candidate code, zero point included, in [qmin, qmax - 1]),
    ``c`` bfloat16 ``[out, in]`` (``2 y - 1``: only the gradient uses it), the start's ``scale`` float32 and
    ``zero`` int8 ``[out, G]``; with the random start also ``start_up`` bool ``[out, in]`` (the start's choice).
    """

    def __init__(self, ql: QuantLinear, start: Start, switch: Switch, init: str, generator: torch.Generator) -> None:
        super().__init__(ql, start, switch)
        qw, p = start.result.qweight, start.result.positions
        if p is None:
            raise ValueError("DiscQuant needs the starting rounding's positions (plain int grids)")
        scheme = qw.scheme
        down = p.floor().clamp(scheme.qmin, scheme.qmax - 1)
        y = (p - down).clamp(0.0, 1.0)  # float32 [out, in]; down + round(y) is the starting code
        self.register_buffer("down", down.to(torch.int8), persistent=False)
        self.register_buffer("c", (2 * y - 1).to(torch.bfloat16), persistent=False)
        self.register_buffer("scale", qw.scale.float().clone(), persistent=False)
        self.register_buffer("zero", None if qw.zero is None else qw.zero.clone(), persistent=False)
        self.register_buffer("start_up", torch.round(y).bool() if init == "random" else None, persistent=False)
        x0 = {"start": lambda: torch.round(y), "position": lambda: y,
              "random": lambda: torch.rand(y.shape, generator=generator)}[init]()
        self.x = nn.Parameter(to_x_dtype(x0))
        self.hard: torch.Tensor | None = None  # while set (0/1 float32 [out, in]), the student uses it for x

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """``down + x - z``, float32 ``[out, in]``."""
        q = self.down.float() + x.float()
        if self.zero is not None:
            q = q - expand_groups(self.zero, q.shape[1]).float()
        return q

    def student_weight(self) -> torch.Tensor:
        x = self.x if self.hard is None else self.hard
        return self._codes(x) * expand_groups(self.scale, x.shape[1])

    def merged(self) -> QuantizedWeight:
        s = self.qweight.scheme
        codes = (self.down.float() + torch.round(self.x.detach())).to(torch.int8).cpu()  # in [qmin, qmax]
        return QuantizedWeight(codes, self.qweight.scale, self.qweight.zero, s, self.qweight.precision)

    @torch.no_grad()
    def round_(self) -> None:
        """Set ``x`` to its rounding (0 or 1): the student then computes exactly what :meth:`merged` stores."""
        self.x.copy_(torch.round(self.x))

    def rounded(self, start: bool = False) -> "contextlib.AbstractContextManager[None]":
        """Within the block the student uses ``round(x)`` (the checkpoint's codes) or, with ``start``, the start's
        choice; ``x`` itself is untouched."""
        return _hard(self, start)


X_DTYPE = torch.bfloat16
# The bfloat16 values next to 1/2 (8 significant bits): a position on either side of a tie stays on its side.
BELOW_HALF, ABOVE_HALF = 0.5 - 2.0**-9, 0.5 + 2.0**-8


def to_x_dtype(x0: torch.Tensor) -> torch.Tensor:
    """``x0`` float32 ``[out, in]`` in [0, 1] as :data:`X_DTYPE`, keeping the side of 1/2 each value is on (a
    position just above a tie must still round up, or zero steps would not reproduce the start)."""
    x = x0.to(X_DTYPE)
    up = torch.round(x0) == 1
    moved = (torch.round(x.float()) == 1) != up
    if bool(moved.any()):
        x = torch.where(moved, torch.where(up, ABOVE_HALF, BELOW_HALF).to(X_DTYPE), x)
    return x.contiguous()


@contextlib.contextmanager
def _hard(twin: DiscLinear, start: bool) -> Iterator[None]:
    if start and twin.start_up is not None:
        twin.hard = twin.start_up.float()
    else:  # the start and position inits round to the start until x moves
        twin.hard = torch.round(twin.x.detach())
    try:
        yield
    finally:
        twin.hard = None


def rounding_noise(twins: list[TrainedLinear]) -> float:
    """``delta^2``: the mean over layers of ``12 mean((W_greedy - W)^2)``, ``W_greedy`` the nearest rounding of the
    float weight on the start's grid (uniform rounding noise of step delta; ALGORITHMS.md 5.2)."""
    values = []
    for t in twins:
        W = t.teacher_weight.float()
        scheme, qw = t.qweight.scheme, t.qweight
        greedy = QuantizedWeight(quantize_codes(W.cpu(), qw.scale, qw.zero, scheme), qw.scale, qw.zero, scheme, qw.precision)
        values.append(12 * float((greedy.dequantize(torch.float32) - W.cpu()).square().mean()))
    return sum(values) / max(len(values), 1)


class DiscTrainer(Trainer):
    """DiscQuant's variables, gradient and projection (module docstring).

    Device defaults: on a GPU the released README's setting (windows of 2048 tokens, 8 per step, 128 steps = its
    1024 windows; lr 0.05, clamp 0.5, rho 200; warm-up over the whole run, as its 128-step warm-up turns out,
    ALGORITHMS.md 5.4). On 2 CPU cores a short run: the budget is set by a SmolLM2 preset's 45 minutes
    (BENCHMARKS.md, issue 16), a higher learning rate and a short warm-up so that x moves in that many steps.
    """

    name = "disc"
    cpu = {"steps": 48, "batch": 2, "seqlen": 512, "lr": 0.15, "scale_lr": 0.0, "warmup": 4, "loss": "kl",
           "rho": 200.0, "clamp": 0.5, "weight_decay": 0.01, "schedule": "cosine"}
    cuda = {"steps": 128, "batch": 8, "seqlen": 2048, "lr": 0.05, "scale_lr": 0.0, "warmup": 128, "loss": "kl",
            "rho": 200.0, "clamp": 0.5, "weight_decay": 0.01, "schedule": "cosine"}

    def __init__(self) -> None:
        self.delta2 = 1.0

    def wrap(self, ql: QuantLinear, start: Start, switch: Switch, s: Settings, generator: torch.Generator) -> TrainedLinear:
        return DiscLinear(ql, start, switch, s.init, generator)

    def optimizer(self, twins: list[TrainedLinear], s: Settings) -> "InBackward":
        """AdamW on each ``x``, stepped inside the backward pass as soon as that ``x``'s gradient is complete
        (a post-accumulate-grad hook edits it, steps, frees it and projects ``x``): only one block's gradients are
        ever held, not a second copy of every weight (SmolLM2: 425 MB less)."""
        self.delta2 = max(rounding_noise(twins), 1e-30)
        return InBackward([t for t in twins if isinstance(t, DiscLinear)], s, self.delta2)

    def before_step(self, twins: list[TrainedLinear], s: Settings) -> None:
        """Nothing left to do: each ``x`` stepped in the backward pass."""

    def describe(self, twins: list[TrainedLinear]) -> dict[str, Any]:
        fractional = sum(int(((t.x > 0.01) & (t.x < 0.99)).sum()) for t in twins if isinstance(t, DiscLinear))
        total = sum(t.x.numel() for t in twins if isinstance(t, DiscLinear))
        return {"delta2": self.delta2, "x_fractional": fractional / max(total, 1)}


class InBackward:
    """One AdamW per ``x``, each stepped from a post-accumulate-grad hook: the gradient is replaced by
    ``-c + clamp(rho dKL/dx / delta^2, -clamp, clamp)``, the step taken, the gradient freed and ``x`` clamped to
    [0, 1]. Looks like one optimizer to the training loop: its ``param_groups`` carry the learning rates (the loop
    sets them per step) and ``step`` / ``zero_grad`` have nothing left to do."""

    def __init__(self, twins: list[DiscLinear], s: Settings, delta2: float) -> None:
        self.opts = [torch.optim.AdamW([t.x], lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay) for t in twins]
        self.param_groups = [g for opt in self.opts for g in opt.param_groups]
        self.handles = [t.x.register_post_accumulate_grad_hook(self._hook(t, opt, s.rho / delta2, s.clamp))
                        for t, opt in zip(twins, self.opts)]

    @staticmethod
    def _hook(t: DiscLinear, opt: torch.optim.Optimizer, factor: float, clamp: float) -> Callable[[torch.Tensor], None]:
        def step(x: torch.Tensor) -> None:
            assert x.grad is not None
            x.grad = (x.grad * factor).clamp_(-clamp, clamp).sub_(t.c.float())
            opt.step()
            x.grad = None
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        return step

    def step(self) -> None:
        """Each ``x`` already stepped in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The hooks freed every gradient."""

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


register_trainer(DiscTrainer())
