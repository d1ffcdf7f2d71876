"""The options of a recipe's stages: rounding (RTN, GPTQ), trained rounding (DiscQuant, LR-QAT), bit allocation (BAQ).

Their own module so that the rounding methods, which take these options, and the recipe, which holds them
and looks the methods up, import in one direction: options <- methods <- recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.scheme import INT_BITS


ORDERS = ("actorder", "gar", "natural")
STARTS = ("gptq", "rtn")


@dataclass(frozen=True)
class RoundingOptions:
    """Options of the rounding methods (GPTQ uses all; RTN uses the clipping search only).

    Attributes:
        damp: relative damping, added to H's diagonal as ``damp * mean(diag H)``.
        block_size: GPTQ's lazy-update block (columns).
        order: column order: "actorder" (descending diag H, with static groups), "gar" (group-aware:
            groups by their largest diag H, columns inside a group by diag H) or "natural".
        static_groups: group scales computed once from the original W (required with "actorder"); otherwise
            each group's scale is computed when GPTQ reaches it, from the already-updated weights.
        mse_clip: search each group's range shrink factor p in [1 - max_shrink, 1] that minimises
            ``sum |Q(w) - w|^clip_norm`` (GPTQ's "MSE" option).
        clip_grid, max_shrink, clip_norm: that search's grid size, range and norm.
        clip_stride: 1 evaluates every candidate (the reference search); k > 1 every k-th, then the
            k - 1 neighbours on each side of the best (formats/int.py ``mse_clip``): 26 of 80 at k = 4.
        refit_scales: after GPTQ, refit each row's group scales by least squares on its output error
            ``(w - w_hat)^T H (w - w_hat)`` with the codes fixed (quantize/refit.py); plain int grids.
        start: DiscQuant's grid and starting rounding: "gptq" (the options above) or "rtn" (round to nearest,
            with the clipping search when ``mse_clip``).
    """

    damp: float = 0.01
    block_size: int = 128
    order: str = "actorder"
    static_groups: bool = True
    mse_clip: bool = False
    clip_grid: int = 100
    max_shrink: float = 0.8
    clip_norm: float = 2.4
    clip_stride: int = 1
    refit_scales: bool = False
    start: str = "gptq"

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise LowbitError(f"unknown rounding start {self.start!r}; valid: {', '.join(STARTS)}")
        if self.order not in ORDERS:
            raise LowbitError(f"unknown rounding order {self.order!r}; valid: {', '.join(ORDERS)}")
        if self.order == "actorder" and not self.static_groups:
            raise LowbitError("order 'actorder' needs static_groups: true (the checkpoint keeps the natural group index)")
        if not 0 <= self.damp < 1 or self.block_size < 1 or not 0 < self.max_shrink < 1 or self.clip_grid < 1 or self.clip_stride < 1:
            raise LowbitError("rounding options out of range: 0 <= damp < 1, block_size >= 1, 0 < max_shrink < 1, clip_grid >= 1, clip_stride >= 1")


INITS = ("start", "position", "random")
TRAIN_LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class TrainingOptions:
    """Options of the rounding methods trained through the model's output (quantize/finetune.py): DiscQuant
    ("disc") and LR-QAT ("lrqat"). ``None`` takes the method's default for the device (docs/RECIPES.md).

    Attributes:
        steps, batch, seqlen: optimizer steps, windows per step and tokens per window.
        lr: learning rate of the trained variables (DiscQuant's x, LR-QAT's A and B).
        scale_lr: LR-QAT's learning rate of the quantizer scales (0 freezes them).
        warmup: linear warm-up steps of the learning rate (then DiscQuant decays by a cosine, LR-QAT linearly).
        loss: "kl" (KL of the float model's next-token distribution to the quantized one's, full vocabulary) or
            "ce" (next-token cross-entropy of the quantized model, no teacher).
        init: DiscQuant's start of x: "start" (0 or 1: exactly the starting rounding, so the relaxed model starts as
            the start's quantized model), "position" (each weight's position between its two grid points: with
            the RTN start the float model itself, with GPTQ's its compensated weights; it rounds to the start) or
            "random" (uniform in [0, 1], the released code's default).
        rho, clamp: DiscQuant's gradient of the scaled KL is multiplied by ``rho`` and clamped to
            ``[-clamp, clamp]`` before the rounding term is added.
        weight_decay: DiscQuant's AdamW weight decay (PyTorch's default 0.01 in the released code).
        rank, alpha: LR-QAT's adapter rank r and scaling alpha (``Z = Phi + alpha / r A B``).
        seed: seeds the training windows and the random starts; None: the run's seed.
    """

    steps: int | None = None
    batch: int | None = None
    seqlen: int | None = None
    lr: float | None = None
    scale_lr: float | None = None
    warmup: int | None = None
    loss: str | None = None
    init: str = "start"
    rho: float | None = None
    clamp: float | None = None
    weight_decay: float | None = None
    rank: int = 32
    alpha: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, least in (("steps", 0), ("batch", 1), ("seqlen", 2), ("warmup", 0), ("rank", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise LowbitError(f"training.{name} must be an integer >= {least}, got {value}")
        for name in ("lr", "rho", "clamp", "alpha"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LowbitError(f"training.{name} must be > 0, got {value}")
        for name in ("scale_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise LowbitError(f"training.{name} must be >= 0, got {value}")
        if self.loss is not None and self.loss not in TRAIN_LOSSES:
            raise LowbitError(f"training.loss must be one of {', '.join(TRAIN_LOSSES)}, got {self.loss!r}")
        if self.init not in INITS:
            raise LowbitError(f"training.init must be one of {', '.join(INITS)}, got {self.init!r}")


SENSITIVITIES = ("fisher", "hessian")


@dataclass(frozen=True)
class BAQOptions:
    """Bit allocation (BAQ) under an average budget.

    Attributes:
        avg_bits: the budget: average storage bits per quantized weight, codes plus scales and zero points.
        widths: the integer code widths a layer may get.
        theta: exponent of the loss model ``L(R) = L(R_ref) * 2^(-theta (R - R_ref))`` of the closed form.
        samples: calibration windows used to measure the sensitivities (None: all of them).
        group_sizes: group sizes a layer may use besides the recipe's (cheaper scales for a coarser group);
            each is resolved per layer like the recipe's group (a group that does not divide a layer's
            input falls back), so it only adds options where it fits.
        asymmetric: also offer asymmetric grids (an integer zero point per group, counted in the cost).
        sensitivity: "fisher" (default): each layer's error weighted by the Fisher diagonal of its outputs,
            an estimate of the change of the model's loss, comparable across layers (one forward +
            backward pass of the float model); "hessian": the plain per-layer proxy ``tr(dW H dW^T)``
            (forward only; layers of different kinds are not on one scale).
    """

    avg_bits: float = 3.5
    widths: tuple[int, ...] = (2, 3, 4, 8)
    theta: float = 1.95
    samples: int | None = 32
    group_sizes: tuple[int, ...] = ()
    asymmetric: bool = False
    sensitivity: str = "fisher"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(sorted(self.widths)))
        object.__setattr__(self, "group_sizes", tuple(sorted(self.group_sizes)))
        if any(g <= 0 for g in self.group_sizes):
            raise LowbitError(f"BAQ group_sizes must be positive, got {self.group_sizes}")
        if not self.widths or any(b not in INT_BITS for b in self.widths):
            raise LowbitError(f"BAQ widths must be a non-empty subset of {INT_BITS}, got {self.widths}")
        if not self.widths[0] <= self.avg_bits:
            raise LowbitError(f"avg_bits {self.avg_bits} is below the narrowest width {self.widths[0]}")
        if self.theta <= 0 or (self.samples is not None and self.samples < 1):
            raise LowbitError("BAQ theta must be > 0 and samples >= 1")
        if self.sensitivity not in SENSITIVITIES:
            raise LowbitError(f"BAQ sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
