"""The staged runner computes exactly what the block computes, and quantizes true-sequentially."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.calibrate.runner import BlockInputs, capture_block_inputs, run_block
from lowbit.calibrate.staged import run_block_staged
from lowbit.calibrate.stats import InputStats
from lowbit.models.loading import get_module, load_float_model, set_module


def _setup(stories_dir: Path):
    model, _, table, _ = load_float_model(stories_dir)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, table, capture_block_inputs(model, table, ids, 2, "cpu")


def test_staged_equals_block_forward(stories_dir: Path) -> None:
    model, table, inputs = _setup(stories_dir)
    block = get_module(model, table.blocks)[2]
    seen: list[tuple[int, int, int]] = []
    expected = run_block(block, inputs)
    staged = run_block_staged(block, table, inputs, lambda i, s: seen.append((i, s.in_features, s.n_tokens)))
    assert inputs.hidden == []  # consumed: the outputs reuse the input storage
    for a, b in zip(staged, expected):
        assert torch.equal(a, b)
    assert seen == [(0, 64, 128), (1, 64, 128), (2, 64, 128), (3, 172, 128)]


def test_later_groups_see_quantized_earlier_groups(stories_dir: Path) -> None:
    """After group 0 is changed inside the callback, group 1's statistics come from the changed layers."""
    model, table, inputs = _setup(stories_dir)
    block = get_module(model, table.blocks)[0]
    o_stats: list[InputStats] = []

    def on_group(i: int, stats: InputStats) -> None:
        if i == 0:
            v = get_module(block, "self_attn.v_proj")
            new = torch.nn.Linear(v.in_features, v.out_features, bias=False)
            new.weight.data = v.weight.data * 0.5
            set_module(block, "self_attn.v_proj", new)
        if i == 1:
            o_stats.append(stats)

    saved = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs)
    outputs = run_block_staged(block, table, inputs, on_group)
    inputs = saved
    reference = InputStats(64, "cpu")
    run_block(block, inputs, {"o": reference}, {"o": get_module(block, "self_attn.o_proj")})  # block now has the halved v
    torch.testing.assert_close(o_stats[0].hessian(), reference.hessian())
    for a, b in zip(outputs, run_block(block, inputs)):
        torch.testing.assert_close(a, b)
