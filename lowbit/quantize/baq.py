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
3. Rounding to the supported widths with the budget met after rounding: each layer starts at the widest
   allowed width not above its ``R_l``; while the total cost (scales counted) exceeds the budget, the
   layer whose step down costs the least measured loss per saved bit steps down; then, while the budget
   allows, the layer whose step up saves the most measured loss per added bit steps up.

Unlike the reference (per input column, fractional level counts, budget met only in expectation), widths
are per layer and integer, so each layer is one compressed-tensors scheme that real kernels run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.calibrate.stats import InputStats
from lowbit.errors import LowbitError
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.rtn import rtn_weight


@dataclass
class LayerSensitivity:
    """One linear's loss and storage cost at each candidate width.

    Attributes:
        name: full module name.
        params: ``out * in``.
        loss: width -> ``sum_o F_o dW_o H dW_o^T`` of RTN at that width (H = X^T X / n, float32; F = 1
            for the plain Hessian proxy).
        cost: width -> storage bits (codes, scales, zero points).
    """

    name: str
    params: int
    loss: dict[int, float]
    cost: dict[int, int]


def measure(
    name: str,
    W: torch.Tensor,
    stats: InputStats,
    scheme: WeightScheme,
    widths: tuple[int, ...],
    scale_dtype: torch.dtype,
    fisher: torch.Tensor | None = None,
) -> LayerSensitivity:
    """Loss and cost of ``W [out, in]`` at each width in ``widths`` under ``scheme`` (its bits replaced).

    ``fisher`` (float32 ``[out]``, optional) weights each output channel's error ``dW_o H dW_o^T``.
    """
    H = stats.hessian()
    F = torch.ones(W.shape[0]) if fisher is None else fisher.float()
    loss, cost = {}, {}
    for b in widths:
        qw = rtn_weight(W, WeightScheme(scheme.format, b, scheme.strategy, scheme.group_size, scheme.symmetric), scale_dtype)
        dW = W.float() - qw.dequantize(torch.float32)
        per_row = ((dW @ H) * dW).sum(dim=1)  # [out]: dW_o H dW_o^T
        loss[b] = float((F @ per_row).clamp_min(0.0))
        cost[b] = qw.storage_bits()
    return LayerSensitivity(name, W.numel(), loss, cost)


def closed_form_rates(layers: list[LayerSensitivity], r_ref: int, theta: float) -> dict[str, float]:
    """Real-valued rates ``R_l`` of the closed form (they average to ``r_ref``, weighted by params)."""
    tiny = 1e-30
    log_e = {l.name: math.log2(max(l.loss[r_ref] / l.params, tiny)) for l in layers}
    total = sum(l.params for l in layers)
    log_bar = sum(l.params * log_e[l.name] for l in layers) / total
    return {l.name: r_ref + (log_e[l.name] - log_bar) / theta for l in layers}


def allocate(layers: list[LayerSensitivity], avg_bits: float, r_ref: int, theta: float) -> tuple[dict[str, int], dict[str, float]]:
    """Integer widths per layer with ``sum cost <= avg_bits * sum params``; also returns the closed-form rates.

    ``r_ref`` must be one of the widths every layer was measured at.
    """
    if not layers:
        return {}, {}
    widths = sorted(layers[0].loss)
    if r_ref not in widths:
        raise LowbitError(f"BAQ reference width {r_ref} is not among the allowed widths {widths}")
    rates = closed_form_rates(layers, r_ref, theta)
    budget = avg_bits * sum(l.params for l in layers)
    by_name = {l.name: l for l in layers}
    choice = {l.name: max([w for w in widths if w <= rates[l.name]] or [widths[0]]) for l in layers}
    spent = sum(by_name[n].cost[w] for n, w in choice.items())

    def step(name: str, direction: int) -> int | None:
        i = widths.index(choice[name]) + direction
        return widths[i] if 0 <= i < len(widths) else None

    while spent > budget:  # step down where a saved bit costs the least loss
        best, best_ratio = None, math.inf
        for n, w in choice.items():
            lower = step(n, -1)
            if lower is None:
                continue
            l = by_name[n]
            ratio = (l.loss[lower] - l.loss[w]) / (l.cost[w] - l.cost[lower])
            if ratio < best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            raise LowbitError(
                f"an average of {avg_bits} bits cannot be met: even {widths[0]}-bit everywhere costs "
                f"{spent / sum(l.params for l in layers):.3f} bits per weight with its scales"
            )
        lower = step(best, -1)
        spent -= by_name[best].cost[choice[best]] - by_name[best].cost[lower]
        choice[best] = lower
    while True:  # spend what is left where an added bit saves the most loss
        best, best_ratio = None, 0.0
        for n, w in choice.items():
            higher = step(n, +1)
            if higher is None:
                continue
            l = by_name[n]
            extra = l.cost[higher] - l.cost[w]
            ratio = (l.loss[w] - l.loss[higher]) / extra
            if spent + extra <= budget and ratio > best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            break
        higher = step(best, +1)
        spent += by_name[best].cost[higher] - by_name[best].cost[choice[best]]
        choice[best] = higher
    return choice, rates
