"""What a recipe says about one transform: its registry name and options (a frozen, JSON-able record)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lowbit.errors import LowbitError
from lowbit.quantize.transforms import TRANSFORMS
from lowbit.quantize.transforms.distill import LOSSES
from lowbit.quantize.transforms.ost import INITS
from lowbit.quantize.transforms.stiefel import RETRACTIONS


@dataclass(frozen=True)
class TransformSpec:
    """One transform of a recipe, in the order the recipe lists it.

    Attributes:
        name: a registry key (``quantize recipes`` lists them).
        random: rotations: a seeded random Hadamard ``diag(s) H`` (signs ``s`` from ``seed``) instead of a plain one.
        seed: rotations: the seed of the random signs.
        block: r4: a block-diagonal Hadamard of this order on the down_proj input (a power of two such as 64 keeps
            vLLM on its fast kernel) instead of one of the full intermediate width.
        alpha: smoothquant: migration strength, ``s = max|X|^alpha / max|W|^(1 - alpha)``; affine: the same exponent
            for the initial norm-side scales.

    The training options below default to None: the transform's default for the device it runs on
    (transforms/ost_train.py, transforms/affine.py).

        steps, batch, seqlen: ost: optimizer steps, windows per step, tokens per window; affine: batch only.
        lr: ost: the rotations' learning rate (Riemannian Adam); affine: the transforms' (AdamW).
        scale_lr: ost: the scales' learning rate (Adam).
        loss: ost: "kl-top" (default), "kl" or "ce".
        topk: ost: the k of KL-Top.
        init: ost: "hadamard" (random Hadamard) or "womi" (principal axes of the readers' weights times a Hadamard).
        retraction: ost: "cayley" or "qr".
        epochs: affine: passes over the calibration windows per block.
        stability: affine: the gradual mask's off-diagonal factor (sf).
        samples: affine: how many of the calibration windows each block trains on.
    """

    name: str
    random: bool = False
    seed: int = 0
    block: int | None = None
    alpha: float = 0.5
    steps: int | None = None
    batch: int | None = None
    seqlen: int | None = None
    lr: float | None = None
    scale_lr: float | None = None
    loss: str | None = None
    topk: int | None = None
    init: str | None = None
    retraction: str | None = None
    epochs: int | None = None
    stability: float | None = None
    samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <the options this transform reads>...}`` (what a recipe file says)."""
        return {"name": self.name, **{o: getattr(self, o) for o in TRANSFORMS[self.name].options}}

    def __post_init__(self) -> None:
        entry = TRANSFORMS.get(self.name)
        if entry is None:
            raise LowbitError(f"unknown transform {self.name!r}; valid: {', '.join(TRANSFORMS)}")
        for f in fields(self):
            if f.name != "name" and f.name not in entry.options and getattr(self, f.name) != f.default:
                takes = ", ".join(entry.options) or "no options"
                raise LowbitError(f"transform {self.name!r} has no option {f.name!r} (it takes {takes})")
        if self.block is not None and self.block < 1:
            raise LowbitError(f"transform {self.name!r}: block must be a positive integer, got {self.block}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"transform {self.name!r}: alpha must be in [0, 1], got {self.alpha}")
        for name in ("steps", "batch", "seqlen", "topk", "epochs", "samples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seqlen" else 1)):
                raise LowbitError(f"transform {self.name!r}: {name} must be a positive integer, got {v!r}")
        for name in ("lr", "scale_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise LowbitError(f"transform {self.name!r}: {name} must be positive, got {v!r}")
        if self.stability is not None and not 0.0 <= self.stability <= 1.0:
            raise LowbitError(f"transform {self.name!r}: stability must be in [0, 1], got {self.stability}")
        for name, allowed in (("loss", LOSSES), ("init", INITS), ("retraction", RETRACTIONS)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise LowbitError(f"transform {self.name!r}: {name} must be one of {', '.join(allowed)}, got {v!r}")
