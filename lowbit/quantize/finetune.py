"""Rounding trained through the model's output: the loop DiscQuant and LR-QAT share (ALGORITHMS.md 4, 5).

The block loop first rounds every layer with the method's starting rounding (GPTQ or clipped RTN for DiscQuant,
RTN on the LP-4 range for LR-QAT) and keeps, per layer, the float weight and that start (quantize/rounding.py
``RoundResult``: codes, grid, positions). Then this loop replaces each QuantLinear by its method's trainable twin
(a :class:`TrainedLinear`), trains the twins' variables on calibration windows and writes their merged integer
codes (and, for LR-QAT, scales) back into the QuantLinear: the checkpoint is an ordinary integer checkpoint.

Each step runs a batch of windows twice from the captured embedding outputs:

* the teacher: the float model (each twin computes with its layer's float weight, no quantizer), no grad;
* the student: the twins' current weights, the recipe's activation and KV-cache quantizers straight-through;
  every block checkpointed (only its input is kept; its inside is recomputed in the backward pass).

The loss is the KL of the teacher's next-token distribution to the student's over the full vocabulary (or the
student's cross-entropy), mean over positions, with the head run a slice of positions at a time
(transforms/distill.py), so ``[positions, vocab]`` logits never exist whole. Ctrl-C stops the run before anything
is written (the pipeline writes only at its end, through a staging directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lowbit.calibrate.runner import capture_block_inputs
from lowbit.calibrate.stats import relative_output_error
from lowbit.calibrate.windows import calibration_windows
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.kernels.online import hook_linear_input, input_transform
from lowbit.kernels.quant_linear import QuantLinear, fake_quantize_activation
from lowbit.models.arch import ArchTable
from lowbit.models.attention import attention_modules, kv_cache_mode
from lowbit.models.loading import get_module, set_module
from lowbit.quantize.options import TrainingOptions
from lowbit.quantize.rounding import RoundResult
from lowbit.quantize.transforms.base import device_defaults
from lowbit.quantize.transforms.distill import head_loss, head_loss_backward


@dataclass
class Start:
    """One layer's starting point: its float weight ``[out, in]`` (model dtype, CPU) and the starting rounding."""

    weight: torch.Tensor
    result: RoundResult

    @classmethod
    def on_cpu(cls, weight: torch.Tensor, result: RoundResult) -> "Start":
        """A start whose tensors are on the CPU whatever device the block was rounded on."""
        qw = result.qweight
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        moved = QuantizedWeight(cpu(qw.codes), cpu(qw.scale), cpu(qw.zero), qw.scheme, qw.precision,
                                cpu(qw.global_scale), cpu(qw.channel_scale))
        return cls(cpu(weight), dataclasses.replace(result, qweight=moved, positions=cpu(result.positions),
                                                    row_loss=cpu(result.row_loss)))


@dataclass(frozen=True)
class Settings:
    """One training run's settings, every value resolved (recipe option, else the method's device default)."""

    steps: int
    batch: int
    seqlen: int
    lr: float
    scale_lr: float
    warmup: int
    loss: str
    init: str
    rho: float
    clamp: float
    weight_decay: float
    rank: int
    alpha: float
    schedule: str
    seed: int

    @classmethod
    def resolve(cls, options: TrainingOptions, device: str, seed: int, cpu: dict[str, Any], cuda: dict[str, Any]) -> "Settings":
        """``options`` with each None filled from ``cpu`` or ``cuda`` (by ``device``); ``seed`` where it gives none."""
        values = device_defaults(dataclasses.asdict(options), device, cpu, cuda)
        return cls(init=options.init, rank=options.rank, alpha=options.alpha,
                   seed=seed if options.seed is None else options.seed, **values)


class Switch:
    """Whether the twins compute as the student (quantized) or the teacher (float); shared by one run's twins."""

    on = False


class TrainedLinear(nn.Module):
    """A QuantLinear's trainable twin: the same online input transform, activation quantizer and bias, with the
    weight the method trains (:meth:`student_weight`) or, as the teacher, the layer's float weight.

    Args:
        ql: the QuantLinear holding the starting rounding.
        start: its float weight and starting rounding.
        switch: student or teacher.
    """

    def __init__(self, ql: QuantLinear, start: Start, switch: Switch) -> None:
        super().__init__()
        self.register_buffer("teacher_weight", start.weight, persistent=False)  # [out, in], model dtype
        self.online = input_transform(ql)
        self.act, self.bias, self.switch = ql.act, ql.bias, switch
        self.qweight = start.result.qweight

    def student_weight(self) -> torch.Tensor:
        """The weight the student computes with, float32 ``[out, in]`` (a graph to the trained variables)."""
        raise NotImplementedError

    def rounded(self, start: bool = False) -> "contextlib.AbstractContextManager[None]":
        """A context within which the student computes with the rounding :meth:`merged` would store (the held-out
        loss is measured there), or with ``start`` the starting rounding; a no-op where the student's forward is
        already rounded and starts at its start (LR-QAT)."""
        return contextlib.nullcontext()

    def merged(self) -> QuantizedWeight:
        """The trained rounding as integer codes and scales (the grid of the start)."""
        raise NotImplementedError

    def student(self, x: torch.Tensor) -> torch.Tensor:
        """The student's ``x [..., in] -> [..., out]`` after the online transform: what QuantLinear computes."""
        if self.act is not None:
            x = fake_quantize_activation(x, self.act, ste=True)
        return F.linear(x, self.student_weight().to(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``, as the student or the teacher."""
        if self.online is not None:
            x = self.online(x)
        if self.switch.on:
            return self.student(x)
        return F.linear(x, self.teacher_weight.to(x.dtype), self.bias)


class Trainer:
    """What a trained rounding method supplies to the loop (subclassed by DiscQuant and LR-QAT).

    Attributes:
        name: the rounding method's name (a key of ROUNDERS).
        cpu, cuda: the device defaults of :class:`Settings` (``schedule``: "cosine" or "linear" after the warm-up).
    """

    name = ""
    cpu: dict[str, Any] = {}
    cuda: dict[str, Any] = {}

    def wrap(self, ql: QuantLinear, start: Start, switch: Switch, s: Settings, generator: torch.Generator) -> TrainedLinear:
        """The trainable twin of ``ql``."""
        raise NotImplementedError

    def optimizer(self, twins: list[TrainedLinear], s: Settings) -> Any:
        """The optimizer of the twins' variables (a torch Optimizer, or anything with its ``param_groups``, ``step``
        and ``zero_grad``); each param group's "lr" is its peak learning rate."""
        raise NotImplementedError

    def before_step(self, twins: list[TrainedLinear], s: Settings) -> None:
        """Edit the gradients after the backward pass (DiscQuant's rounding term, LR-QAT's norm clipping)."""

    def after_step(self, twins: list[TrainedLinear]) -> None:
        """Project the variables after the optimizer step (DiscQuant: ``x`` into [0, 1])."""

    def describe(self, twins: list[TrainedLinear]) -> dict[str, Any]:
        """Method-specific numbers for the report."""
        return {}


TRAINERS: dict[str, Trainer] = {}


def register_trainer(trainer: Trainer) -> Trainer:
    """Add ``trainer`` to :data:`TRAINERS` under its name."""
    if trainer.name in TRAINERS:
        raise ValueError(f"trainer {trainer.name!r} registered twice")
    TRAINERS[trainer.name] = trainer
    return trainer


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of ``step`` (0-based) as a fraction of the peak: a linear warm-up over ``warmup`` steps
    (from 0 at step 0), then a cosine or linear decay to 0 at ``steps``: transformers'
    ``get_{cosine,linear}_schedule_with_warmup`` as the released code steps it (scheduler after optimizer)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


@dataclass
class FinetuneReport:
    """What training did: settings, loss per step, seconds, the held-out loss before and after, the share of codes
    that differ from the starting rounding, each layer's relative output error with the final codes (measured on
    the held-out windows), and the method's own numbers. The held-out losses are those of the rounded model: the
    start's before, the checkpoint's after."""

    method: str
    settings: Settings
    losses: list[float]
    seconds: float
    held_out_before: float
    held_out_after: float
    codes_changed: float
    output_errors: dict[str, float]
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The report's entry (without the seconds: the report file stays the same from run to run)."""
        return {"method": self.method, "settings": dataclasses.asdict(self.settings), "losses": self.losses,
                "held_out_loss_before": self.held_out_before, "held_out_loss_after": self.held_out_after,
                "codes_changed": self.codes_changed, **self.extra}


class _Distiller:
    """Teacher and student passes of the model (twins in place) from the captured embedding outputs, and the loss."""

    def __init__(self, model: nn.Module, table: ArchTable, switch: Switch, loss: str) -> None:
        self.blocks = get_module(model, table.blocks)
        self.norm, self.head = get_module(model, table.final_norm), get_module(model, table.lm_head)
        self.attns = [m for _, m in attention_modules(model, table.blocks, table.attention)]
        self.switch, self.loss_name = switch, loss
        w, b = self.head.weight, self.head.bias
        self.head_w = w if w.dtype == torch.float32 else w.float()  # converted once, not per slice
        self.head_b = None if b is None else (b if b.dtype == torch.float32 else b.float())

    def _run(self, h: torch.Tensor, kw: dict[str, Any], grad: bool) -> torch.Tensor:
        """The final norm's output ``[b (L - 1), D]`` (last position dropped) for embedding outputs ``h [b, L, D]``."""
        for block in self.blocks:
            if grad:
                h = checkpoint(_block, block, h, kw, use_reentrant=False)
            else:
                h = _block(block, h, kw)
        return self.norm(h)[:, :-1].reshape(-1, h.shape[-1])

    @torch.no_grad()
    def teacher(self, h0: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor | None:
        """The float model's head input, or None for "ce" (no teacher)."""
        if self.loss_name == "ce":
            return None
        self.switch.on = False
        with kv_cache_mode(self.attns, quantize=False):
            return self._run(h0, kw, grad=False)

    def _head(self, u: torch.Tensor) -> torch.Tensor:
        """The output head in float32, whatever the model's dtype."""
        return F.linear(u.float(), self.head_w, self.head_b)

    def loss(self, h0: torch.Tensor, kw: dict[str, Any], ids: torch.Tensor, backward: bool) -> float:
        """The mean loss per position of one batch (``ids [b, L]``); with ``backward`` its gradients accumulate."""
        u_teacher = self.teacher(h0, kw)
        targets = ids[:, 1:].reshape(-1)
        self.switch.on = True
        try:
            # The backward pass recomputes the checkpointed blocks: it must see the same KV-cache mode.
            with kv_cache_mode(self.attns, ste=backward):
                if not backward:
                    with torch.no_grad():
                        return head_loss(self._head, self._run(h0, kw, grad=False), u_teacher, targets, self.loss_name, 0)
                u = self._run(h0, kw, grad=True)
                value, grad = head_loss_backward(self._head, u, u_teacher, targets, self.loss_name, 0)
                u.backward(grad)
                return value
        finally:
            self.switch.on = False


HELD_OUT_WINDOWS = 8  # the held-out part of the text: this many windows of the training length (or 5 %)


def split_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, seqlen: int) -> tuple[list[str], list[str]]:
    """``texts`` split into (training, held-out) text: the held-out part is the end of the joined text, its last 5 %
    or :data:`HELD_OUT_WINDOWS` windows of ``seqlen`` tokens if that is more (at most half of it), so the held-out
    windows share no token with the training windows. Lengths in characters use the text's own characters per
    token. A text too short to split is used whole for both."""
    joined = "\n\n".join(texts)
    n_tokens = max(1, len(tokenizer(joined[:200_000], add_special_tokens=False).input_ids))
    chars_per_token = min(len(joined), 200_000) / n_tokens
    held = int(min(max(HELD_OUT_WINDOWS * seqlen * chars_per_token, 0.05 * len(joined)), 0.5 * len(joined)))
    held = max(held, int(1.2 * seqlen * chars_per_token))
    if held >= len(joined):
        return texts, texts  # too short to split: the held-out windows are drawn from the same text
    return [joined[: len(joined) - held]], [joined[len(joined) - held :]]


def _block(block: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def finetune(
    model: nn.Module, table: ArchTable, starts: dict[str, Start], trainer: Trainer, s: Settings,
    texts: list[str], tokenizer: PreTrainedTokenizerBase, device: str = "cpu", progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Train the rounding of every layer in ``starts`` (full module name -> start; each a QuantLinear in ``model``)
    and write the merged codes back into those QuantLinears.

    The training windows (``s.steps * s.batch`` of ``s.seqlen`` tokens) are cut with ``s.seed`` from ``texts`` less
    their last part (:func:`split_texts`); the held-out loss is measured on ``s.batch`` windows of that last part
    before (the start) and after training (the merged rounding). Each step's embedding outputs are computed when
    the step runs, so memory does not grow with the number of steps.
    """
    t0 = time.perf_counter()
    train_texts, held_texts = split_texts(texts, tokenizer, s.seqlen)
    windows = calibration_windows(train_texts, tokenizer, max(1, s.steps) * s.batch, s.seqlen, s.seed)
    held = calibration_windows(held_texts, tokenizer, s.batch, s.seqlen, s.seed + 1)
    dev = torch.device(device)
    held_in = capture_block_inputs(model, table, held, s.batch, dev)
    generator = torch.Generator().manual_seed(s.seed)
    switch = Switch()
    quantlinears = {name: get_module(model, name) for name in starts}
    losses: list[float] = []
    with ExitStack() as stack:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        stack.callback(lambda: [p.requires_grad_(f) for p, f in flags])
        for p, _ in flags:
            p.requires_grad_(False)
        twins = {name: trainer.wrap(ql, starts[name], switch, s, generator) for name, ql in quantlinears.items()}
        stack.callback(lambda: [set_module(model, name, ql) for name, ql in quantlinears.items()])
        for name, twin in twins.items():
            set_module(model, name, twin)
        stack.callback(lambda: model.to("cpu"))
        model.to(dev)
        for st in starts.values():
            st.result.positions = None  # the twins hold what they need of them
        distiller = _Distiller(model, table, switch, s.loss)

        def held_out(start: bool) -> float:
            """The loss on the held-out windows of the model the merge would write (rounded), or of the start."""
            with ExitStack() as rounding:
                for twin in twins.values():
                    rounding.enter_context(twin.rounded(start))
                return distiller.loss(held_in.hidden[0], held_in.kwargs[0], held.to(dev), backward=False)

        before = held_out(start=True)
        opt = trainer.optimizer(list(twins.values()), s)
        close = getattr(opt, "close", None)  # an optimizer stepping inside the backward pass removes its hooks
        if close is not None:
            stack.callback(close)
        peaks = [group["lr"] for group in opt.param_groups]
        bar = tqdm(range(s.steps), desc=trainer.name, unit="step", disable=not progress)
        for step in bar:
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * lr_factor(step, s.steps, s.warmup, s.schedule)
            ids = windows[step * s.batch : (step + 1) * s.batch]
            step_in = capture_block_inputs(model, table, ids.to(dev), s.batch, dev)  # this step's embeddings only
            losses.append(distiller.loss(step_in.hidden[0], step_in.kwargs[0], ids.to(dev), backward=True))
            trainer.before_step(list(twins.values()), s)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trainer.after_step(list(twins.values()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, losses[-1])
        after = held_out(start=False)
        del opt
        extra = trainer.describe(list(twins.values()))
        changed = total = 0
        for name, twin in twins.items():
            qw = twin.merged()
            changed += int((qw.codes != starts[name].result.qweight.codes).sum())
            total += qw.codes.numel()
            quantlinears[name].set_quantized(qw)
    errors = output_errors(model, {n: st.weight for n, st in starts.items()}, held_in.hidden[0], held_in.kwargs[0], table)
    return FinetuneReport(trainer.name, s, losses, time.perf_counter() - t0, before, after, changed / max(total, 1),
                          errors, extra)


@torch.no_grad()
def output_errors(model: nn.Module, weights: dict[str, torch.Tensor], h0: torch.Tensor, kw: dict[str, Any],
                  table: ArchTable) -> dict[str, float]:
    """``||X (W - W_hat)^T|| / ||X W^T||`` of each QuantLinear named in ``weights`` (its float weight ``[out, in]``),
    with ``X`` its inputs when the blocks run on ``h0 [b, L, D]``."""
    errors: dict[str, float] = {}
    handles = []
    device = h0.device

    def measure(name: str, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1]).float()
        H = X.t() @ X / max(X.shape[0], 1)
        ql = get_module(model, name)
        errors[name] = relative_output_error(weights[name].to(device), ql.dequantized_weight().float(), H)

    for name in weights:
        handles.append(hook_linear_input(get_module(model, name), lambda x, name=name: measure(name, x)))
    try:
        model.to(device)
        h = h0
        for block in get_module(model, table.blocks):
            h = _block(block, h, kw)
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")
        for name in weights:
            get_module(model, name)._w_hat = None
    return errors
