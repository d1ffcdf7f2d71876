"""Training OSTQuant's transforms through the whole model (ALGORITHMS.md 2.3, 2.4), then fusing them.

Each step takes a batch of calibration windows and runs them twice from the captured embedding outputs:

* the teacher: the model as it is (float, no quantizer), no grad;
* the student: the residual stream rotated by R1, each block with the weights of ``OstParams.block_weights``
  (``torch.func.functional_call``: the model's modules are not edited while training) and the recipe's quantizers
  simulated with straight-through rounding (formats/int.py): the weights (weight-only and 8-bit-activation
  recipes, clipped RTN), each linear's input, and the KV cache (models/attention.py). An online R4 that the recipe
  lists after ``ost`` is simulated on down_proj's input, so the activations are trained in the basis they will be
  quantized in.

The loss (KL-Top by default) runs over the output head a slice at a time (transforms/distill.py); every block is
checkpointed (only its input is kept; its inside is recomputed in the backward pass), so the memory held is one
block's activations plus ``n_layers`` block inputs. Rotations take Riemannian Adam steps (transforms/stiefel.py),
scales Adam steps, both with a cosine decay. Ctrl-C stops the run: nothing has been written yet (the pipeline
writes its output only at the end, through a staging directory).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from lowbit.calibrate.runner import capture_block_inputs
from lowbit.calibrate.windows import calibration_windows
from lowbit.errors import LowbitError
from lowbit.formats.hadamard import block_hadamard
from lowbit.formats.int import fake_quantize_ste
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.kernels.quant_linear import fake_quantize_activation
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.attention import attention_modules, kv_cache_mode
from lowbit.models.loading import get_module, set_module
from lowbit.quantize.transforms.base import TRAINED, TrainContext, device_defaults, register
from lowbit.quantize.transforms.distill import LOSSES, head_loss, head_loss_backward
from lowbit.quantize.transforms.ost import INITS, OstParams
from lowbit.quantize.transforms.rotations import r4_rotation
from lowbit.quantize.transforms.stiefel import RETRACTIONS, StiefelAdam, cosine_lr, orthogonality_error

# What a run on 2 CPU cores can afford: SmolLM2-135M takes about 17 s a step of 2 x 512 tokens there, so 32 steps
# are some 10 minutes of a w4a4kv4-ost run's 15-20. With 32 steps instead of the paper's 100-150 the released
# learning rates barely move the transforms; larger ones did better on held-out windows in a short sweep
# (BENCHMARKS.md, 2026-12-06). On a GPU: the paper's setting (ALGORITHMS.md 2.4: 100 steps of 2048-token windows;
# the released runs use 4 x 8 devices, one GPU here takes 8) and the released code's learning rates (rotations
# 0.0169 by Riemannian Adam, scales 0.00179).
CPU_DEFAULTS = {"steps": 32, "batch": 2, "seqlen": 512, "lr": 0.2, "scale_lr": 0.01}
CUDA_DEFAULTS = {"steps": 100, "batch": 8, "seqlen": 2048, "lr": 0.0169, "scale_lr": 0.00179}
COMMON_DEFAULTS = {"loss": "kl-top", "topk": 1000, "init": "hadamard", "retraction": "cayley"}


@dataclass(frozen=True)
class OstSettings:
    """One training run's settings, every value resolved (recipe option, else the device's default)."""

    steps: int
    batch: int
    seqlen: int
    lr: float
    scale_lr: float
    loss: str
    topk: int
    init: str
    retraction: str
    seed: int = 0

    @classmethod
    def resolve(cls, device: str, **given: Any) -> "OstSettings":
        """Fill the options left None from the defaults of ``device`` ("cpu" or "cuda..."), and check them."""
        values = device_defaults(given, device, {**COMMON_DEFAULTS, **CPU_DEFAULTS}, {**COMMON_DEFAULTS, **CUDA_DEFAULTS})
        s = cls(seed=int(given.get("seed") or 0), **values)
        for name in ("steps", "batch", "seqlen", "topk"):
            if getattr(s, name) < (2 if name == "seqlen" else 1):
                raise LowbitError(f"ost: {name} must be a positive integer, got {getattr(s, name)}")
        if s.lr <= 0 or s.scale_lr < 0:
            raise LowbitError(f"ost: learning rates must be positive, got lr={s.lr}, scale_lr={s.scale_lr}")
        for name, allowed in (("loss", LOSSES), ("init", INITS), ("retraction", RETRACTIONS)):
            if getattr(s, name) not in allowed:
                raise LowbitError(f"ost: {name} must be one of {', '.join(allowed)}, got {getattr(s, name)!r}")
        return s


class _Switch:
    """Whether the student's quantizers are on (shared by every StudentLinear of one run)."""

    on = False


class StudentLinear(nn.Module):
    """A float linear as the student runs it: simulated R4, activation fake-quant, weight fake-quant, matmul.

    Holds the wrapped linear's own ``weight`` and ``bias`` parameters under the same names, so
    ``functional_call`` can substitute the transformed ones. With the switch off it is the plain linear.
    """

    def __init__(self, linear: nn.Linear, switch: _Switch, weights: WeightScheme | None, act: ActScheme | None,
                 r4: tuple[int, torch.Tensor | None] | None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.switch, self.weights, self.act, self.r4 = switch, weights, act, r4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        w = self.weight
        if self.switch.on:
            if self.r4 is not None:  # x H and W H: the product is unchanged, the quantizers see the rotated basis
                x, w = block_hadamard(x, *self.r4), block_hadamard(w, *self.r4)
            if self.act is not None:
                x = fake_quantize_activation(x, self.act, ste=True)
            if self.weights is not None:
                w = fake_quantize_ste(w, self.weights.for_layer(w.shape[1])).to(w.dtype)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@dataclass
class OstReport:
    """What training did: settings, loss per step, seconds, the orthogonality of the learned rotations, and the loss
    on held-out windows before and after training."""

    settings: OstSettings
    losses: list[float]
    seconds: float
    orthogonality: float
    held_out_before: float
    held_out_after: float

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dataclasses.asdict(self.settings), "losses": self.losses, "seconds": self.seconds,
                "orthogonality_error": self.orthogonality, "held_out_loss_before": self.held_out_before,
                "held_out_loss_after": self.held_out_after}


def _later_r4(ctx: TrainContext, geometry: Geometry) -> tuple[int, torch.Tensor | None] | None:
    """(block, signs) of an r4 the recipe lists after ost, or None."""
    for spec in ctx.later:
        if spec.name == "r4":
            return r4_rotation(geometry, spec.block, spec.random, spec.seed)
    return None


def _quantizers(ctx: TrainContext) -> tuple[WeightScheme | None, ActScheme | None]:
    """Which quantizers the student simulates: activations whenever the recipe quantizes them; weights when the
    activations are absent or 8-bit (with 4-bit activations OSTQuant trains on activations only, then GPTQ)."""
    act: ActScheme | None = ctx.activations
    train_weights = act is None or act.bits >= 8
    weights = ctx.weights if train_weights and ctx.weights.is_plain_int else None
    return weights, act


class _Student:
    """The model set up for training, as a context manager: StudentLinear modules in place of its block linears and
    straight-through KV quantizers while inside (the model is restored on leaving), the teacher and student passes
    from the captured embedding outputs, and the loss between them.

    The quantizers are on in the student pass only: the switch for the linears; the KV cache as installed (the
    teacher runs with it off).
    """

    def __init__(self, model: nn.Module, table: ArchTable, params: OstParams, ctx: TrainContext,
                 r4: tuple[int, torch.Tensor | None] | None, s: OstSettings) -> None:
        self.table, self.params, self.s, self.ctx, self.r4 = table, params, s, ctx, r4
        self.model = model
        self.blocks = get_module(model, table.blocks)
        self.norm, self.head = get_module(model, table.final_norm), get_module(model, table.lm_head)
        self.switch = _Switch()
        self.attns = [m for _, m in attention_modules(model, table.blocks, table.attention)]
        self.stack = ExitStack()

    def __enter__(self) -> "_Student":
        weights, act = _quantizers(self.ctx)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        originals = [(block, n, get_module(block, n)) for block in self.blocks for n in self.table.linears]
        self.stack.callback(lambda: [p.requires_grad_(flag) for p, flag in flags])
        self.stack.callback(lambda: [set_module(block, n, linear) for block, n, linear in originals])
        self.stack.enter_context(kv_cache_mode(self.attns, ste=True))
        for p, _ in flags:
            p.requires_grad_(False)
        for block, n, linear in originals:
            r4 = self.r4 if n == self.table.down else None
            set_module(block, n, StudentLinear(linear, self.switch, weights, act, r4))
        return self

    def __exit__(self, *exc: object) -> None:
        self.switch.on = False
        self.stack.close()

    @torch.no_grad()
    def teacher(self, h0: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """The float model's head input ``[b (L - 1), D]`` for the embedding outputs ``h0 [b, L, D]``."""
        self.switch.on = False
        h = h0
        with kv_cache_mode(self.attns, quantize=False):
            for block in self.blocks:
                out = block(h, **kw)
                h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)[:, :-1].reshape(-1, h.shape[-1])

    def student(self, h0: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """The transformed, fake-quantized model's head input ``[b (L - 1), D]`` (float32; a graph to the params)."""
        self.switch.on = True
        R1 = self.params.R1.float()
        h = h0.float() @ R1
        for i, block in enumerate(self.blocks):
            h = checkpoint(_student_block, self.params, i, block, h, kw, use_reentrant=False)
        return (self.norm(h) @ R1.T)[:, :-1].reshape(-1, h.shape[-1])

    def _head(self, u: torch.Tensor) -> torch.Tensor:
        """The output head in float32, whatever the model's dtype (the student's stream is float32)."""
        bias = self.head.bias
        return F.linear(u.float(), self.head.weight.float(), None if bias is None else bias.float())

    def loss(self, h0: torch.Tensor, kw: dict[str, Any], ids: torch.Tensor, backward: bool) -> float:
        """The mean loss per position of one batch (``ids [b, L]``); with ``backward`` its gradients accumulate."""
        u_teacher = self.teacher(h0, kw)
        targets = ids[:, 1:].reshape(-1)
        if not backward:
            with torch.no_grad():
                return head_loss(self._head, self.student(h0, kw), u_teacher, targets, self.s.loss, self.s.topk)
        u = self.student(h0, kw)
        value, grad = head_loss_backward(self._head, u, u_teacher, targets, self.s.loss, self.s.topk)
        u.backward(grad)
        return value


def train_ost(model: nn.Module, table: ArchTable, geometry: Geometry, ctx: TrainContext, s: OstSettings) -> OstReport:
    """Learn OSTQuant's transforms on ``model`` (norm gains folded, lm_head untied) and fuse them into it.

    Before and after training the loss is measured on ``s.batch`` held-out windows (drawn with the next seed), so
    the report says whether training helped on data it did not see.
    """
    t0 = time.perf_counter()
    params = OstParams(geometry, len(get_module(model, table.blocks)), table)
    if s.init == "womi":
        params.init_womi(model, s.seed)
    else:
        params.init_hadamard(s.seed)
    windows = calibration_windows(ctx.texts, ctx.tokenizer, s.steps * s.batch, s.seqlen, ctx.seed)
    held = calibration_windows(ctx.texts, ctx.tokenizer, s.batch, s.seqlen, ctx.seed + 1)
    inputs = capture_block_inputs(model, table, windows, s.batch, ctx.device)
    held_in = capture_block_inputs(model, table, held, s.batch, ctx.device)
    device = torch.device(ctx.device)
    model.to(device)
    params.to(device)
    losses: list[float] = []
    try:
        with _Student(model, table, params, ctx, _later_r4(ctx, geometry), s) as student:
            held_before = student.loss(held_in.hidden[0], held_in.kwargs[0], held.to(device), backward=False)
            rot = StiefelAdam(params.rotations(), lr=s.lr, retraction=s.retraction)
            sca = torch.optim.Adam(params.scales(), lr=s.scale_lr)
            bar = tqdm(range(s.steps), desc="ost", unit="step", disable=not ctx.progress)
            for step in bar:
                for opt, lr in ((rot, s.lr), (sca, s.scale_lr)):
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(step, s.steps, lr)
                ids = windows[step * s.batch : (step + 1) * s.batch].to(device)
                losses.append(student.loss(inputs.hidden[step], inputs.kwargs[step], ids, backward=True))
                rot.step()
                sca.step()
                rot.zero_grad(set_to_none=True)
                sca.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            held_after = student.loss(held_in.hidden[0], held_in.kwargs[0], held.to(device), backward=False)
    finally:
        model.to("cpu")
    params.to("cpu")
    params.fuse(model)
    ortho = max(orthogonality_error(params.R1.detach()), orthogonality_error(params.R2.detach()))
    return OstReport(s, losses, time.perf_counter() - t0, ortho, held_before, held_after)


def _student_block(params: OstParams, i: int, block: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """Block ``i`` of the student on ``h [b, L, D]`` (float32) with the transformed weights."""
    out = functional_call(block, params.block_weights(i, block, torch.float32), (h,), kw)
    return out[0] if isinstance(out, tuple) else out


OST_OPTIONS = ("steps", "batch", "seqlen", "lr", "scale_lr", "loss", "topk", "init", "retraction", "seed")


@register("ost", TRAINED, options=OST_OPTIONS, needs=("fold_norms",),
          description="OSTQuant: learned R1, per-KV-head R2 and diagonal scalings (norm, v->o, up->down, q->k), trained "
                      "with KL-Top through the recipe's quantizers, fused into the weights")
def ost(model: nn.Module, table: ArchTable, geometry: Geometry, ctx: TrainContext, **options: Any) -> dict[str, Any]:
    """Train and fuse OSTQuant's transforms; returns the training report (settings, losses) for the run's report."""
    settings = OstSettings.resolve(ctx.device, **options)
    return train_ost(model, table, geometry, ctx, settings).to_dict()
