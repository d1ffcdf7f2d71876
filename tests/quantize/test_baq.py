"""BAQ: the closed form keeps the average, the rounding meets the budget (scales counted) and spends it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.calibrate.stats import InputStats
from lowbit.errors import LowbitError
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.quantize.baq import LayerSensitivity, allocate, chain, closed_form_rates, measure
from lowbit.quantize.recipe import PRESETS

WIDTHS = (2, 3, 4, 8)

F16_SCALES = Precision(torch.float32, torch.float16)  # a float32 model's default: float16 scales


def _layers(seed: int = 0, n: int = 12) -> list[LayerSensitivity]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n):
        params = int(torch.randint(1, 5, (1,), generator=g)) * 4096
        base = float(torch.rand(1, generator=g)) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
        loss = {b: base * 2.0 ** (-2 * (b - 4)) for b in WIDTHS}
        cost = {b: params * b + params // 64 * 16 for b in WIDTHS}  # fp16 scale per 64 weights
        layers.append(LayerSensitivity(f"l{i}", params, loss, cost))
    return layers


def _widths(scheme: WeightScheme) -> dict[int, WeightScheme]:
    return {b: dataclasses.replace(scheme, bits=b) for b in WIDTHS}


def test_closed_form_averages_to_reference() -> None:
    layers = _layers()
    rates = closed_form_rates(layers, 4, 1.95)
    total = sum(l.params for l in layers)
    assert sum(l.params * rates[l.name] for l in layers) / total == pytest.approx(4.0)
    # more loss per weight -> more bits
    per_weight = sorted(layers, key=lambda l: l.loss[4] / l.params)
    assert [rates[l.name] for l in per_weight] == sorted(rates[l.name] for l in per_weight)


@pytest.mark.parametrize("avg_bits", [2.6, 3.0, 3.5, 4.25, 6.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_met_after_rounding(avg_bits: float, seed: int) -> None:
    layers = _layers(seed)
    choice, _ = allocate(layers, avg_bits, 4, 1.95)
    total = sum(l.params for l in layers)
    spent = sum(l.cost[choice[l.name]] for l in layers)
    assert spent <= avg_bits * total
    assert set(choice.values()) <= set(WIDTHS)
    # and nothing is left on the table: no single layer could step up within the budget
    for l in layers:
        i = WIDTHS.index(choice[l.name])
        if i + 1 < len(WIDTHS):
            assert spent + l.cost[WIDTHS[i + 1]] - l.cost[choice[l.name]] > avg_bits * total


def test_allocation_prefers_sensitive_layers() -> None:
    layers = _layers(3)
    choice, _ = allocate(layers, 3.5, 4, 1.95)
    ranked = sorted(layers, key=lambda l: l.loss[4] / l.params)
    assert choice[ranked[-1].name] >= choice[ranked[0].name]


def test_impossible_budget_is_a_clear_error() -> None:
    with pytest.raises(LowbitError, match="cannot be met"):
        allocate(_layers(), 2.0, 4, 1.95)  # 2-bit codes alone cost 2 bits, plus scales


def test_measure_is_the_hessian_proxy() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    stats = InputStats(64, "cpu")
    stats.add(torch.randn(256, 64, generator=g))
    s = measure("x", W, stats, _widths(WeightScheme(bits=4, strategy="group", group_size=32)), F16_SCALES)
    assert s.loss[2] > s.loss[3] > s.loss[4] > s.loss[8] > 0
    assert s.cost[4] == 16 * 64 * 4 + 16 * 2 * 16 + 2 * 64  # codes + two fp16 scales per row + weight_shape (int64 [2])
    assert s.cost[8] == 16 * 64 * 8 + 16 * 2 * 16  # int8 codes (int-quantized: no weight_shape)


def test_baq_end_to_end(tmp_path: Path, stories_dir: Path, stored_bits_per_weight) -> None:
    out = tmp_path / "baq"
    result = lowbit.quantize_model(stories_dir, PRESETS["baq-3.5"], out, samples=8, calib_seqlen=64, progress=False, avg_bits=3.6)
    assert result.bits_per_weight == stored_bits_per_weight(out) <= 3.6  # the budget met by the file
    widths = {l.bits for l in result.layers}
    assert len(widths) > 1  # a mix, stored per layer
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = {g["weights"]["num_bits"] for g in qc["config_groups"].values()}
    assert stored == widths
    model = lowbit.load(out)
    by_name = dict(model.named_modules())
    for l in result.layers:
        assert by_name[l.name].scheme.bits == l.bits
    report = json.loads((out / "quantize_report.json").read_text())
    assert set(report["baq_closed_form_rates"]) == {l.name for l in result.layers}


def test_avg_bits_needs_a_baq_recipe(stories_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="BAQ"):
        lowbit.quantize_model(stories_dir, "w4a16", tmp_path / "x", avg_bits=3.0, progress=False)


def test_fisher_weights_each_output_channel() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 64, generator=g)
    stats = InputStats(64, "cpu")
    stats.add(torch.randn(128, 64, generator=g))
    scheme = WeightScheme(bits=4, strategy="group", group_size=32)
    plain = measure("x", W, stats, _widths(scheme), F16_SCALES)
    F = torch.zeros(8)
    F[3] = 2.0
    weighted = measure("x", W, stats, _widths(scheme), F16_SCALES, fisher=F)
    only_row3 = measure("x", W[3:4], stats, _widths(scheme), F16_SCALES)
    for b in WIDTHS:
        assert weighted.loss[b] == pytest.approx(2.0 * only_row3.loss[b], rel=1e-5)
        assert weighted.loss[b] < plain.loss[b] * 2.0


@pytest.mark.parametrize("sensitivity", ["fisher", "hessian"])
def test_both_sensitivities_allocate_within_budget(tmp_path: Path, stories_dir: Path, sensitivity: str) -> None:
    recipe = PRESETS["baq-3.5"]
    recipe = dataclasses.replace(recipe, baq=dataclasses.replace(recipe.baq, sensitivity=sensitivity, samples=4))
    result = lowbit.quantize_model(stories_dir, recipe, tmp_path / "o", samples=8, calib_seqlen=64, progress=False, avg_bits=3.6)
    assert result.bits_per_weight <= 3.6
    assert len({l.bits for l in result.layers}) > 1


def test_chain_is_the_lower_convex_hull() -> None:
    # (cost, loss): "b" is dominated by the cheaper "a"; "d" lies above the segment c -> e
    layer = LayerSensitivity("l", 100, {"a": 10.0, "b": 11.0, "c": 4.0, "d": 3.5, "e": 1.0, "f": 1.0},
                             {"a": 100, "b": 150, "c": 200, "d": 250, "e": 300, "f": 400})
    assert chain(layer) == ["a", "c", "e"]


def test_allocation_over_schemes_meets_the_budget() -> None:
    """Options that differ in group size and symmetry, not just width, keyed by scheme, one reference per layer."""
    g = torch.Generator().manual_seed(2)
    layers, refs = [], {}
    for i in range(6):
        W = torch.randn(32, 128, generator=g) * (1 + i)
        stats = InputStats(128, "cpu")
        stats.add(torch.randn(256, 128, generator=g))
        options = {}
        for b in (2, 3, 4):
            for gs in (32, 64):
                for sym in (True, False):
                    s = WeightScheme(bits=b, strategy="group", group_size=gs, symmetric=sym)
                    options[s] = s
        refs[f"l{i}"] = WeightScheme(bits=4, strategy="group", group_size=32)
        layers.append(measure(f"l{i}", W, stats, options, F16_SCALES))
    for avg in (2.6, 3.3, 4.2):
        choice, rates = allocate(layers, avg, refs, 1.95, bits=lambda k: k.bits)
        spent = sum(l.cost[choice[l.name]] for l in layers)
        total = sum(l.params for l in layers)
        assert spent <= avg * total
        assert all(choice[l.name] in chain(l) for l in layers)
        # nothing left on the table: no layer's next option on its chain fits the budget
        for l in layers:
            c = chain(l)
            i = c.index(choice[l.name])
            if i + 1 < len(c):
                assert spent + l.cost[c[i + 1]] - l.cost[c[i]] > avg * total
    assert sum(l.params * rates[l.name] for l in layers) / sum(l.params for l in layers) == pytest.approx(4.0)


def test_baq_chooses_group_sizes_and_asymmetric_grids(tmp_path: Path, stories_dir: Path, stored_bits_per_weight) -> None:
    recipe = PRESETS["baq-3.5"]
    recipe = dataclasses.replace(
        recipe, weights=WeightScheme(bits=4, strategy="group", group_size=32),
        baq=dataclasses.replace(recipe.baq, group_sizes=(64,), asymmetric=True, samples=4),
    )
    out = tmp_path / "o"
    result = lowbit.quantize_model(stories_dir, recipe, out, samples=8, calib_seqlen=64, progress=False, avg_bits=3.4)
    assert result.bits_per_weight == stored_bits_per_weight(out) <= 3.4
    model = lowbit.load(out)
    by_name = dict(model.named_modules())
    for l in result.layers:
        scheme = by_name[l.name].scheme
        assert (scheme.bits, scheme.strategy, scheme.group_size, scheme.symmetric) == (l.bits, l.strategy, l.group_size, l.symmetric)
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["recipe"]["baq"]["asymmetric"] is True and report["recipe"]["baq"]["group_sizes"] == [64]
