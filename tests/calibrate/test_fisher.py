"""Whole-model sensitivity statistics: the Fisher diagonal and Hessians match direct computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit.calibrate import fisher
from lowbit.calibrate.fisher import collect_sensitivity_stats
from lowbit.calibrate.runner import capture_block_inputs, run_block
from lowbit.calibrate.stats import InputStats
from lowbit.models.loading import get_module, load_float_model


def _setup(stories_dir: Path):
    model, _, table, _ = load_float_model(stories_dir)
    ids = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    return model, table, ids


@pytest.mark.parametrize("head_chunk", [64, 8])  # one slice of the head's 31 targets, or four (the last partial)
def test_fisher_matches_retained_output_gradients(stories_dir: Path, head_chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fisher, "HEAD_CHUNK", head_chunk)
    model, table, ids = _setup(stories_dir)
    names = {f"{table.blocks}.{i}.{n}" for i in (0, 3) for n in table.linears}
    stats = collect_sensitivity_stats(model, table, ids, names, progress=False)
    assert set(stats.fisher) == names and set(stats.inputs) == names

    # independent computation: retain every output's gradient, one window at a time with the whole
    # window's logits, sum g^2 over tokens
    target = f"{table.blocks}.3.mlp.down_proj"
    linear = get_module(model, target)
    outs: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _a: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    handle = linear.register_forward_hook(keep)
    total = torch.zeros(linear.out_features, dtype=torch.float64)
    try:
        for w in range(ids.shape[0]):
            model.zero_grad()
            logits = model(input_ids=ids[w : w + 1], use_cache=False).logits
            F.cross_entropy(logits[0, :-1].float(), ids[w, 1:], reduction="sum").backward()
            total += outs[-1].grad.reshape(-1, linear.out_features).double().pow(2).sum(0)
    finally:
        handle.remove()
    expected = (total / ids.numel()).float()
    assert expected.abs().max() > 0
    torch.testing.assert_close(stats.fisher[target], expected, rtol=1e-4, atol=1e-12)


def test_hessians_are_the_float_inputs_and_shared_per_group(stories_dir: Path) -> None:
    model, table, ids = _setup(stories_dir)
    prefix = f"{table.blocks}.1"
    names = {f"{prefix}.{n}" for n in table.linears}
    stats = collect_sensitivity_stats(model, table, ids, names, progress=False)
    q, k, v = (stats.inputs[f"{prefix}.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert stats.inputs[f"{prefix}.mlp.gate_proj"] is stats.inputs[f"{prefix}.mlp.up_proj"]

    # the same statistics from the block-by-block float forward
    inputs = capture_block_inputs(model, table, ids, 1, "cpu")
    blocks = get_module(model, table.blocks)
    inputs.hidden = run_block(blocks[0], inputs)
    down = get_module(blocks[1], "mlp.down_proj")
    ref = InputStats(down.in_features, "cpu")
    run_block(blocks[1], inputs, {"down": ref}, {"down": down}, keep_outputs=False)
    torch.testing.assert_close(stats.inputs[f"{prefix}.mlp.down_proj"].hessian(), ref.hessian(), rtol=1e-4, atol=1e-6)


def test_parameters_stay_as_they_were(stories_dir: Path) -> None:
    model, table, ids = _setup(stories_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    collect_sensitivity_stats(model, table, ids[:1], {f"{table.blocks}.0.mlp.up_proj"}, progress=False)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        assert p.grad is None
        assert torch.equal(p.detach(), before[n])
