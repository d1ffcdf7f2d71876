"""BAQ: bit widths per layer under an average-bit budget (ALGORITHMS.md §6).

1. Sensitivity: for every linear, the loss of round-to-nearest at each allowed width b, and the storage
   cost of the layer at that width, codes plus scales and zero points. The loss is the Fisher-weighted
   proxy ``E_l(b) = sum_o F_o dW_bo H dW_bo^T`` (``sensitivity: fisher``, the default; F from the output
   gradients of the model's loss, calibrate/fisher.py), an estimate of the change of the model's loss
   that is comparable across layer kinds and depths, or the plain Hessian proxy ``tr(dW_b H dW_b^T)``
   (``sensitivity: hessian``, the reference's per-layer loss, which measures each layer's output error
   in its own units). H comes from the float model's calibration inputs.
2. Closed form: with ``E_l(R) = E_l(R_ref) 2^(-theta (R - R_ref))``, minimising ``sum E_l`` subject to
   ``sum n_l R_l = R_ref sum n_l`` equalises the per-weight loss:
   ``R_l = R_ref + (1/theta) log2(e_l / e_bar)``, with ``e_l = E_l(R_ref)/n_l`` and ``log2 e_bar`` the
   n-weighted mean of ``log2 e_l``.
3. Rounding to the supported widths with the budget met after rounding: each layer's options (widths,
   and optionally group sizes and asymmetric grids) are put on a chain, the lower convex hull of
   (cost, loss); each layer starts at the best option whose width is not above its ``R_l``; while the
   total cost (scales and zero points counted) exceeds the budget, the layer whose step down its chain
   costs the least measured loss per saved bit steps down; then, while the budget allows, the layer
   whose step up saves the most measured loss per added bit steps up.

Unlike the reference (per input column, fractional level counts, budget met only in expectation), widths
are per layer and integer, so each layer is one compressed-tensors scheme that real kernels run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from lowbit.calibrate.stats import InputStats
from lowbit.errors import LowbitError
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.formats.storage import stored_bits
from lowbit.quantize.rtn import rtn_weight

K = TypeVar("K")


@dataclass
class LayerSensitivity:
    """One linear's loss and storage cost at each candidate width.

    Attributes:
        name: full module name.
        params: ``out * in``.
        loss: option -> ``sum_o F_o dW_o H dW_o^T`` of RTN under that option (H = X^T X / n, float32;
            F = 1 for the plain Hessian proxy). An option is a width, or a whole layer scheme (width,
            group size, symmetry) when the allocation also chooses the grid.
        cost: option -> bits of the layer's tensors in the checkpoint (codes, scales, zero points, shape).
    """

    name: str
    params: int
    loss: dict[Any, float]
    cost: dict[Any, int]


def measure(
    name: str,
    W: torch.Tensor,
    stats: InputStats,
    candidates: Mapping[K, WeightScheme],
    precision: Precision,
    fisher: torch.Tensor | None = None,
) -> LayerSensitivity:
    """Loss and cost of ``W [out, in]`` under each candidate scheme (key -> scheme, resolved for the layer).

    ``fisher`` (float32 ``[out]``, optional) weights each output channel's error ``dW_o H dW_o^T``.
    """
    H = stats.hessian()
    loss, cost = {}, {}
    for key, scheme in candidates.items():
        qw = rtn_weight(W, scheme, precision)
        loss[key] = weighted_loss(W, qw.dequantize(torch.float32), H, fisher)
        cost[key] = stored_bits(qw.scheme, W.shape[0], W.shape[1], precision.scale_dtype)
    return LayerSensitivity(name, W.numel(), loss, cost)


def weighted_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """``sum_o F_o dW_o H dW_o^T`` for ``W, W_hat [out, in]``, ``H [in, in]`` and ``fisher [out]`` (None: F = 1)."""
    dW = W.float() - W_hat.float()
    per_row = ((dW @ H) * dW).sum(dim=1)  # [out]: dW_o H dW_o^T
    F = torch.ones(W.shape[0], device=per_row.device) if fisher is None else fisher.float().to(per_row.device)
    return float((F @ per_row).clamp_min(0.0))


def chain(layer: LayerSensitivity) -> list[Any]:
    """The layer's options on the lower convex hull of (cost, loss), cheapest first.

    An option that costs more but loses no less than a cheaper one is dropped, and so is one whose step
    buys less loss per bit than the step after it: along the chain the price of a saved unit of loss
    only rises, so stepping up where it is cheapest is the greedy optimum.
    """
    options = sorted(layer.loss, key=lambda k: (layer.cost[k], layer.loss[k]))
    hull: list[Any] = []
    for k in options:
        if hull and layer.loss[k] >= layer.loss[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            gain_ab = (layer.loss[a] - layer.loss[b]) / max(layer.cost[b] - layer.cost[a], 1)
            gain_bk = (layer.loss[b] - layer.loss[k]) / max(layer.cost[k] - layer.cost[b], 1)
            if gain_ab > gain_bk:
                break
            hull.pop()
        hull.append(k)
    return hull


def _references(layers: list[LayerSensitivity], r_ref: Any) -> dict[str, Any]:
    """Layer name -> key of its reference option, from one shared key or a mapping per layer."""
    return dict(r_ref) if isinstance(r_ref, Mapping) else {l.name: r_ref for l in layers}


def closed_form_rates(
    layers: list[LayerSensitivity], r_ref: Any, theta: float, ref_bits: float | None = None
) -> dict[str, float]:
    """Real-valued rates ``R_l`` (code bits) of the closed form; they average to the reference width, weighted by params.

    ``r_ref`` is the key of the reference option (or a dict: layer name -> its key), ``ref_bits`` its code
    width (``r_ref`` itself when keys are widths).
    """
    tiny = 1e-30
    ref_of = _references(layers, r_ref)
    ref = float(r_ref if ref_bits is None else ref_bits)
    log_e = {l.name: math.log2(max(l.loss[ref_of[l.name]] / l.params, tiny)) for l in layers}
    total = sum(l.params for l in layers)
    log_bar = sum(l.params * log_e[l.name] for l in layers) / total
    return {l.name: ref + (log_e[l.name] - log_bar) / theta for l in layers}


def allocate(
    layers: list[LayerSensitivity],
    avg_bits: float,
    r_ref: Any,
    theta: float,
    bits: Callable[[Any], int] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One option per layer with ``sum cost <= avg_bits * sum params``; also returns the closed-form rates.

    Args:
        r_ref: key of the reference option (the recipe's width), or a dict layer name -> its key when
            the keys are layer schemes (the reference grid resolved for each layer).
        bits: key -> code width (identity when the keys are widths).
    """
    if not layers:
        return {}, {}
    bits = bits or (lambda k: int(k))
    ref_of = _references(layers, r_ref)
    if any(ref_of.get(l.name) not in l.loss for l in layers):
        raise LowbitError(f"BAQ reference option {r_ref} was not measured for every layer")
    ref_bits = {bits(k) for k in ref_of.values()}
    if len(ref_bits) != 1:
        raise LowbitError(f"BAQ reference options have different widths: {sorted(ref_bits)}")
    rates = closed_form_rates(layers, ref_of, theta, ref_bits.pop())
    budget = avg_bits * sum(l.params for l in layers)
    by_name = {l.name: l for l in layers}
    chains = {l.name: chain(l) for l in layers}

    def start(l: LayerSensitivity) -> Any:
        """The closed form rounded down: the best option whose width is not above ``R_l``."""
        below = [k for k in chains[l.name] if bits(k) <= rates[l.name]]
        return below[-1] if below else chains[l.name][0]

    choice = {l.name: start(l) for l in layers}
    spent = sum(by_name[n].cost[k] for n, k in choice.items())

    def step(name: str, direction: int) -> Any | None:
        c = chains[name]
        i = c.index(choice[name]) + direction
        return c[i] if 0 <= i < len(c) else None

    while spent > budget:  # step down where a saved bit costs the least loss
        best, best_ratio = None, math.inf
        for n, k in choice.items():
            lower = step(n, -1)
            if lower is None:
                continue
            l = by_name[n]
            ratio = (l.loss[lower] - l.loss[k]) / (l.cost[k] - l.cost[lower])
            if ratio < best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            raise LowbitError(
                f"an average of {avg_bits} bits cannot be met: even the cheapest option of every layer costs "
                f"{spent / sum(l.params for l in layers):.3f} bits per weight with its scales"
            )
        lower = step(best, -1)
        spent -= by_name[best].cost[choice[best]] - by_name[best].cost[lower]
        choice[best] = lower
    while True:  # spend what is left where an added bit saves the most loss
        best, best_ratio = None, 0.0
        for n, k in choice.items():
            higher = step(n, +1)
            if higher is None:
                continue
            l = by_name[n]
            extra = l.cost[higher] - l.cost[k]
            ratio = (l.loss[k] - l.loss[higher]) / extra
            if spent + extra <= budget and ratio > best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            break
        higher = step(best, +1)
        spent += by_name[best].cost[higher] - by_name[best].cost[choice[best]]
        choice[best] = higher
    return choice, rates
