"""The registry of rounding methods: name -> pure function of (W, H, scheme).

A rounding method takes the float weight ``W [out, in]``, the Hessian proxy ``H = X^T X [in, in]``
(float32, or None when the method declares it needs none) and a WeightScheme, and returns a
QuantizedWeight. It touches no hooks, files or printing (DESIGN.md principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme


class RoundFn(Protocol):
    def __call__(
        self, W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, scale_dtype: torch.dtype
    ) -> QuantizedWeight: ...


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


# The methods register themselves on import; importing them here keeps ROUNDERS complete for any importer.
from lowbit.quantize import rtn as _rtn  # noqa: E402,F401
