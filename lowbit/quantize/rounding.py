"""The registry of rounding methods: name -> pure function of (W, H, scheme).

A rounding method takes the float weight ``W [out, in]``, the Hessian proxy ``H = X^T X / n [in, in]``
(float32, or None when the method declares it needs none), a WeightScheme, the Precision (scale storage and
model dtype, formats/precision.py) and the recipe's RoundingOptions, and returns a RoundResult. It touches no hooks, files or printing (DESIGN.md principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from lowbit.formats.precision import Precision
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme
from lowbit.distributed import split_rows
from lowbit.quantize.options import RoundingOptions


@dataclass
class RoundResult:
    """A rounding method's output.

    Attributes:
        qweight: the quantized weight.
        loss: the method's own objective where it has one (GPTQ: ``sum (w - q)^2 / [H^-1]_jj^2 / 2``).
        note: what went differently from the plan (damping escalated, fallback to RTN...), for the report.
        row_loss: the objective per output row, float32 ``[out]`` (sums to ``loss``), where the method has one.
        positions: plain int grids: float32 ``[out, in]``, the continuous value each code was rounded from, in
            code units (zero point included), within half a step of the code (:func:`start_positions`): where a
            trained rounding (DiscQuant) starts from. None for other grids.
    """

    qweight: QuantizedWeight
    loss: float | None = None
    note: str | None = None
    row_loss: torch.Tensor | None = None
    positions: torch.Tensor | None = None


# How far inside its code's rounding interval a position is kept: round(position) is the code, ties excluded.
HALF_STEP = 0.4999


def start_positions(values: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The positions of :class:`RoundResult`: ``raw`` (what the method rounded, in code units, float32 ``[out, in]``)
    moved to within :data:`HALF_STEP` of its code ``values`` (same shape), so that ``round(position) == values``
    exactly, even where the code was clamped to the grid's ends or a float error put ``raw`` on the other side of
    a tie."""
    return values + (raw - values).clamp(-HALF_STEP, HALF_STEP)


class RoundFn(Protocol):
    def __call__(
        self, W: torch.Tensor, H: torch.Tensor | None, scheme: WeightScheme, precision: Precision,
        options: RoundingOptions,
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



def stack_results(parts: list[RoundResult]) -> RoundResult:
    """Row blocks of one rounding (consecutive rows, in order) as one result: losses summed, the first note kept."""
    if len(parts) == 1:
        return parts[0]

    def stack(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if any(t is None for t in ts) else torch.cat(ts)  # type: ignore[arg-type]

    losses = [p.loss for p in parts]
    row_loss = stack([p.row_loss for p in parts])
    if row_loss is not None:
        loss: float | None = float(row_loss.sum())  # as the method sums it over every row
    else:
        loss = None if any(x is None for x in losses) else float(sum(losses))  # type: ignore[arg-type]
    return RoundResult(
        QuantizedWeight.cat([p.qweight for p in parts]), loss, next((p.note for p in parts if p.note), None),
        row_loss, stack([p.positions for p in parts]),
    )


def round_together(
    method: RoundingMethod,
    Ws: list[torch.Tensor],
    H: torch.Tensor | None,
    scheme: WeightScheme,
    precision: Precision,
    options: RoundingOptions,
) -> list[RoundResult]:
    """Round several weights ``[out_i, in]`` that read the same input (one Hessian) with one call.

    With one scale per row or per group of a row, RTN and GPTQ treat rows independently: GPTQ's order,
    damping and inverse-Hessian factor depend on H alone, and each row's updates on that row alone. So
    ``W = cat(Ws)`` (q/k/v, gate/up) is rounded once, sharing the factorisation and the column loop, and
    the result is split back by rows; a tensor-wide scale (also NVFP4's global scale and FireQ's
    power-of-two pre-scale, scale format "e4m3") would couple the rows, so those are rounded one by one:
    each layer keeps its own tensor-wide scale, as compressed-tensors writes them.
    """
    if scheme.strategy == "tensor" or scheme.scale_format == "e4m3":
        return [method.fn(W, H, scheme, precision, options) for W in Ws]
    W_all = Ws[0] if len(Ws) == 1 else torch.cat([W.float() for W in Ws])
    # With several processes (lowbit/distributed.py), each rounds its share of the rows: rows are independent.
    parts = split_rows(W_all.shape[0], lambda a, b: method.fn(W_all[a:b], H, scheme, precision, options))
    res = stack_results([p for p in parts if p is not None])
    if len(Ws) == 1:
        return [res]
    out, start = [], 0
    for W in Ws:
        stop = start + W.shape[0]
        row_loss = None if res.row_loss is None else res.row_loss[start:stop]
        loss = None if row_loss is None else float(row_loss.sum())
        positions = None if res.positions is None else res.positions[start:stop]
        out.append(RoundResult(res.qweight.rows(start, stop), loss, res.note, row_loss, positions))
        start = stop
    return out
