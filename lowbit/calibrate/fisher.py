"""Whole-model sensitivity statistics: input Hessians and output-gradient Fisher diagonals of every linear.

BAQ compares the cost of quantization error across layers of different kinds (q/k, v/o, MLP) and depths.
The Hessian proxy ``tr(dW H dW^T)`` of one linear measures its OUTPUT error, which is in different units
for every layer; what is comparable is the change of the model's loss. A second-order Taylor expansion of
the loss in a linear's output ``Y = X W^T`` with the empirical Fisher as its curvature, and the
approximation that a token's output gradient is independent of its input, gives

    dL ~= 1/2 sum_t sum_o g_to^2 (dW_o x_t)^2 ~= n/2 sum_o F_o dW_o H dW_o^T

with ``F_o = mean_t g_to^2`` (the diagonal Fisher of output channel o, ``g = dLoss/dY``) and
``H = X^T X / n``. Both come from one forward + backward pass of the FLOAT model over the calibration
windows (next-token cross-entropy, summed over tokens); no parameter gradient is kept, only the
activation gradients the hooks read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrate.staged import input_of_linear
from lowbit.kernels.online import hook_linear_input
from lowbit.calibrate.stats import InputStats
from lowbit.models.arch import ArchTable
from lowbit.models.loading import get_module


# Tokens per slice of the output head in the loss's backward: [64, vocab] float32 logits are 12.6 MB for
# SmolLM2 (49152 words), under the pipeline's 16 MiB mmap threshold, where the whole window's logits, their
# log-softmax and both gradients would be 4 x 96 MB at once (the pass's peak: BENCHMARKS.md, 2026-11-29, 70ca3af).
HEAD_CHUNK = 64


@dataclass
class SensitivityStats:
    """Statistics of every requested linear, keyed by full module name.

    Attributes:
        inputs: ``InputStats`` of the linear's input (``X^T X``, float32 ``[in, in]``); linears that read
            the same tensor (one true-sequential sub-group) share one object.
        fisher: ``F_o = mean_t (dLoss/dY_to)^2``, float32 ``[out]``.
    """

    inputs: dict[str, InputStats]
    fisher: dict[str, torch.Tensor]


class _FisherAccumulator:
    """Sums ``g^2`` over tokens for one linear's output gradient ``g [..., out]``."""

    def __init__(self, out_features: int) -> None:
        self.sum = torch.zeros(out_features, dtype=torch.float64)
        self.n_tokens = 0

    def add(self, g: torch.Tensor) -> None:
        G = g.detach().reshape(-1, g.shape[-1]).float()
        self.sum += G.pow(2).sum(0).double()
        self.n_tokens += G.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n_tokens, 1)).float()


def collect_sensitivity_stats(
    model: nn.Module, table: ArchTable, windows: torch.Tensor, names: set[str], progress: bool = True
) -> SensitivityStats:
    """One forward + backward pass of ``model`` per window of ``windows [N, L]`` (int64 token ids).

    Args:
        names: full module names of the linears to measure (``model.layers.3.mlp.down_proj``...).
        progress: show a progress bar over the windows.

    Windows run one at a time so the graph of a single window is all the autograd memory held. The
    model's parameters are frozen for the pass (their ``requires_grad`` flags are restored after).
    """
    blocks = get_module(model, table.blocks)
    inputs: dict[str, InputStats] = {}
    fisher: dict[str, _FisherAccumulator] = {}
    handles = []

    def grad_hook(acc: _FisherAccumulator):
        def forward_hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(acc.add)
        return forward_hook

    for i, block in enumerate(blocks):
        for group in table.sequential:
            members = [n for n in group if f"{table.blocks}.{i}.{n}" in names]
            if not members:
                continue
            first = get_module(block, members[0])
            shared = InputStats(first.in_features, "cpu")
            handles.append(hook_linear_input(first, lambda x, acc=shared: acc.add(x.detach())))
            for n in members:
                linear = get_module(block, n)
                inputs[f"{table.blocks}.{i}.{n}"] = shared
                acc = fisher[f"{table.blocks}.{i}.{n}"] = _FisherAccumulator(linear.out_features)
                handles.append(linear.register_forward_hook(grad_hook(acc)))
    # activations need a graph even though no parameter does: start it at the embedding output
    embed = get_module(model, table.embed)
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for w in tqdm(range(windows.shape[0]), desc="sensitivity", unit="window", disable=not progress):
                loss_backward(model, table, windows[w : w + 1])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return SensitivityStats(inputs, {n: acc.mean() for n, acc in fisher.items()})


def loss_backward(model: nn.Module, table: ArchTable, ids: torch.Tensor) -> None:
    """Backpropagate the next-token cross-entropy (summed over tokens) of one window ``ids [1, L]``.

    The model runs up to its output head; the head and the loss then run on HEAD_CHUNK tokens at a
    time, each slice's gradient accumulating into the head's input ``h [1, L, D]``, which is then
    backpropagated through the blocks once. Same gradients as one head call over the whole window,
    without its ``[L, vocab]`` logits held four times over.
    """
    head = get_module(model, table.lm_head)
    h = input_of_linear(model, model, table.lm_head, ids, {"use_cache": False})  # [1, L, D], graph to the embedding
    h_leaf = h.detach().requires_grad_(True)
    targets = ids[0, 1:]  # token t predicts token t + 1; the last position has no target
    for s in range(0, targets.numel(), HEAD_CHUNK):
        e = min(s + HEAD_CHUNK, targets.numel())
        logits = head(h_leaf[0, s:e])  # [e - s, vocab]
        F.cross_entropy(logits.float(), targets[s:e], reduction="sum").backward()
    h.backward(h_leaf.grad)
