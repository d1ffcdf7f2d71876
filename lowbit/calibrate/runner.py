"""The block-by-block runner: capture block-0 inputs once, then run one decoder block at a time.

Only one block's calibration activations live in memory: the inputs of the current block (a list of
``[b, L, D]`` batches) and, while it runs, its outputs, which become the next block's inputs.

The runners use ``no_grad`` rather than ``inference_mode``: their tensors are ordinary tensors, so a learned
transform can later train on them (inference tensors refuse autograd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.calibrate.stats import InputStats
from lowbit.kernels.online import hook_linear_input
from lowbit.models.arch import ArchTable
from lowbit.models.loading import get_module


@dataclass
class BlockInputs:
    """Calibration inputs of one decoder block.

    Attributes:
        hidden: one ``[b, L, D]`` tensor per batch, in the model dtype, on the processing device.
        kwargs: the keyword arguments the model passes to every block for that batch (position
            embeddings, attention mask, position ids...), captured once from block 0.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass after block 0's inputs are stored."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        raise _Captured


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor inside nested tuples/lists/dicts (a block's keyword arguments); the rest kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, table: ArchTable, windows: torch.Tensor, batch_size: int, device: torch.device | str
) -> BlockInputs:
    """Run the embeddings on ``windows [N, L]`` and return what block 0 receives, batch by batch.

    The model stays where it is (CPU); only the embedding runs, because a catcher replaces block 0 and
    stops the forward pass as soon as block 0 is called. Caches are disabled.
    """
    blocks = get_module(model, table.blocks)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    hidden, kwargs = [], []
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i : i + batch_size], use_cache=False)
            except _Captured:
                pass
            hidden.append(catcher.args[0].to(device) if catcher.args else catcher.kwargs.pop("hidden_states").to(device))
            kw = {k: v for k, v in catcher.kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")}
            kwargs.append(to_device(kw, device))
    finally:
        blocks[0] = catcher.block
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, stats: dict[str, InputStats] | None = None,
              modules: dict[str, nn.Module] | None = None, keep_outputs: bool = True) -> list[torch.Tensor]:
    """Run ``block`` on every batch of ``inputs``; return the outputs (``[b, L, D]`` per batch).

    Args:
        stats: accumulators keyed like ``modules``; each receives the input of its module on every batch.
        modules: name -> submodule of ``block`` whose inputs feed ``stats``.
        keep_outputs: return the outputs (False when only the statistics are wanted).
    """
    handles = []
    for name, acc in (stats or {}).items():
        module = (modules or {})[name]
        handles.append(hook_linear_input(module, lambda x, acc=acc: acc.add(x)))
    outputs = []
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            out = block(h, **kw)
            out = out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)
            if keep_outputs:
                outputs.append(out)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
