"""BAQ's bit allocation inside the pipeline: the candidates of each layer, the sensitivity pass over the float model
(Fisher or per-block Hessians), then quantize/baq.py's allocation under the average-bit budget."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrate.fisher import collect_sensitivity_stats
from lowbit.calibrate.runner import capture_block_inputs
from lowbit.calibrate.staged import run_block_staged
from lowbit.calibrate.stats import InputStats
from lowbit.errors import LowbitError
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.models.arch import ArchTable
from lowbit.models.loading import get_module
from lowbit.quantize import baq
from lowbit.quantize.block import is_ignored
from lowbit.quantize.recipe import Recipe


def baq_candidates(base: WeightScheme, recipe: Recipe, in_features: int) -> tuple[dict[WeightScheme, WeightScheme], WeightScheme]:
    """BAQ's options for a layer with ``in_features`` inputs (each scheme resolved for the layer), and the reference.

    Widths from ``baq.widths`` (plus the recipe's, the reference), the model-wide group and
    ``baq.group_sizes``, the recipe's symmetry and, with ``baq.asymmetric``, the asymmetric grid.
    """
    assert recipe.baq is not None
    opts = recipe.baq
    widths = sorted(set(opts.widths) | {base.bits})
    groups = [base.group_size] + ([g for g in opts.group_sizes if g != base.group_size] if base.strategy == "group" else [])
    symmetric = [base.symmetric] + ([False] if opts.asymmetric and base.symmetric else [])
    found: dict[WeightScheme, WeightScheme] = {}
    for b in widths:
        for g in groups:
            for sym in symmetric:
                scheme = dataclasses.replace(base, bits=b, group_size=g, symmetric=sym).for_layer(in_features)
                found.setdefault(scheme, scheme)
    return found, base.for_layer(in_features)


def bit_allocation(
    model: nn.Module, table: ArchTable, windows: torch.Tensor, recipe: Recipe, base: WeightScheme,
    precision: Precision, batch_size: int, device: str, progress: bool,
) -> tuple[dict[str, WeightScheme], dict[str, float]]:
    """BAQ's sensitivity pass over the float model, then the allocation: (scheme, closed-form rate) per layer."""
    assert recipe.baq is not None
    opts = recipe.baq
    n = windows.shape[0] if opts.samples is None else min(opts.samples, windows.shape[0])
    blocks = get_module(model, table.blocks)
    names = [
        f"{table.blocks}.{i}.{n}" for i in range(len(blocks)) for n in table.linears
        if not is_ignored(f"{table.blocks}.{i}.{n}", recipe.ignore)
    ]
    wanted = set(names)
    layers: list[baq.LayerSensitivity] = []
    refs: dict[str, WeightScheme] = {}

    def add(name: str, W: torch.Tensor, stats: InputStats, fisher: torch.Tensor | None) -> None:
        candidates, refs[name] = baq_candidates(base, recipe, W.shape[1])
        layers.append(baq.measure(name, W, stats, candidates, precision, fisher))

    if opts.sensitivity == "fisher":
        stats = collect_sensitivity_stats(model, table, windows[:n], wanted, progress)
        for name in tqdm(names, desc="bit widths", unit="layer", disable=not progress):
            add(name, get_module(model, name).weight.data, stats.inputs[name], stats.fisher[name])
        del stats
    else:
        inputs = capture_block_inputs(model, table, windows[:n], batch_size, device)
        for i in tqdm(range(len(blocks)), desc="sensitivity", unit="block", disable=not progress):
            block, prefix = blocks[i].to(device), f"{table.blocks}.{i}"

            def on_group(index: int, stats: InputStats) -> None:
                for n in table.sequential[index]:
                    if f"{prefix}.{n}" in wanted:
                        add(f"{prefix}.{n}", get_module(block, n).weight.data, stats, None)

            inputs.hidden = run_block_staged(block, table, inputs, on_group)
            blocks[i] = block.to("cpu")
    chosen, rates = baq.allocate(layers, opts.avg_bits, refs, opts.theta, bits=lambda k: k.bits)
    allowed = set(opts.widths)
    if not {s.bits for s in chosen.values()} <= allowed:  # the reference width was measured but is not allowed
        raise LowbitError(f"BAQ chose widths outside {sorted(allowed)}: add the recipe's weights.bits to baq.widths")
    return chosen, rates
