"""The registry of rounding methods: name -> pure function of (W, H, scheme).

A rounding method takes the float weight ``W [out, in]``, the Hessian proxy ``H = X^T X / n [in, in]``
(float32, or None when the method declares it needs none), a WeightScheme, the scale storage dtype and
the recipe's RoundingOptions, and returns a RoundResult. It touches no hooks, files or printing (DESIGN.md principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme

if TYPE_CHECKING:
    from lowbit.quantize.recipe import RoundingOptions


@dataclass
class RoundResult:
    """A rounding method's output.

    Attributes:
        qweight: the quantized weight.
        loss: the method's own objective where it has one (GPTQ: ``sum (w - q)^2 / [H^-1]_jj^2 / 2``).
        note: what went differently from the plan (damping escalated, fallback to RTN...), for the report.
    """

    qweight: QuantizedWeight
    loss: float | None = None
    note: str | None = None


class RoundFn(Protocol):
    def __call__(
        self, W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, scale_dtype: torch.dtype,
        options: "RoundingOptions",
    ) -> RoundResult: ...


@dataclass(frozen=True)
class RoundingMethod:
    """A registered rounding method and what statistics it needs before it can run."""

    name: str
    fn: RoundFn
    needs_hessian: bool


ROUNDERS: dict[str, RoundingMethod] = {}


def register_rounder(name: str, needs_hessian: bool) -> Callable[[RoundFn], RoundFn]:
    """Decorator: add a rounding function to ROUNDERS under ``name``."""

    def add(fn: RoundFn) -> RoundFn:
        if name in ROUNDERS:
            raise ValueError(f"rounding method {name!r} registered twice")
        ROUNDERS[name] = RoundingMethod(name, fn, needs_hessian)
        return fn

    return add

