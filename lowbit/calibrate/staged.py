"""True-sequential quantization of a pre-norm decoder block in one pass over the calibration data.

A pre-norm block computes ``h1 = h + attn(norm1(h))`` then ``out = h1 + mlp(norm2(h1))``. Its four
true-sequential sub-groups of linears read four tensors that appear in that order: ``norm1(h)`` (q/k/v),
the input of o_proj, ``norm2(h1)`` (gate/up) and the input of down_proj. Running the block stage by stage
over *all* calibration batches, and letting a callback quantize each sub-group as soon as its input
statistics are complete, gives every later stage the outputs of the already-quantized earlier linears —
the semantics of re-running the block once per sub-group (GPTQ's --true-sequential) at the cost of one
forward pass. The block's outputs fall out of the last stage.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lowbit.memory import release_free_heap
from lowbit.calibrate.runner import BlockInputs
from lowbit.calibrate.stats import InputStats
from lowbit.kernels.online import input_transform
from lowbit.models.arch import ArchTable
from lowbit.models.loading import get_module

# (index of the sub-group in table.sequential, statistics of its input) -> None; may swap modules in the block.
GroupCallback = Callable[[int, InputStats], None]
# (index of the sub-group, its input per batch, the block's keyword arguments per batch) -> True if it changed the
# block so that the input must be computed again. Runs before the statistics are taken and the input is consumed:
# a data-dependent transform (SmoothQuant) measures the input here and folds its scales into the block.
StageHook = Callable[[int, list[torch.Tensor], list[dict[str, Any]]], bool]


class _Stop(Exception):
    """Raised by a pre-hook once the input of the branch's last linear is captured."""


def input_of_linear(block: nn.Module, branch: nn.Module, linear: str, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run ``branch`` on ``x`` up to ``linear`` (a path in ``block``) and return that linear's input.

    Nothing after ``linear`` runs: a pre-hook captures the input (before the linear's own online input transform,
    if it has one: the linear is then called on it) and stops the forward.
    """
    captured: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _Stop

    handle = get_module(block, linear).register_forward_pre_hook(grab)
    try:
        branch(x, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{linear} was not called by its branch: the architecture table does not match the block")
    return captured[0]


def _consume(xs: list[Any], fn: Callable[[int, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``[fn(k, xs[k]) for k]``, each ``xs[k]`` dropped from the list once its result exists.

    The per-batch lists are the stream's size (151 MB for SmolLM2's calibration; the down_proj inputs
    403 MB): holding a list and its successor whole would make the block's peak one list larger, and so would
    glibc keeping the freed batches (9.4 MB each, under the mmap threshold) resident between live ones.
    """
    out = []
    for k in range(len(xs)):
        out.append(fn(k, xs[k]))
        xs[k] = None
        release_free_heap()  # the batch just freed sits between live ones in glibc's heap: give its pages back
    return out


def _stats(xs: list[torch.Tensor], linear: nn.Module | None = None) -> InputStats:
    """Statistics of what ``linear``'s weight multiplies: ``xs`` after its online input transform, if it has one
    (kernels/online.py), so the Hessian is in the rotated basis; ``xs`` themselves are left as they are."""
    t = None if linear is None else input_transform(linear)
    acc = InputStats(xs[0].shape[-1], xs[0].device)
    for x in xs:
        acc.add(x if t is None else t(x))
    acc.all_reduce()  # every process's batches (lowbit/distributed.py); nothing alone
    return acc


@torch.no_grad()
def run_block_staged(
    block: nn.Module, table: ArchTable, inputs: BlockInputs, on_group: GroupCallback, before: StageHook | None = None,
) -> list[torch.Tensor]:
    """Run ``block`` stage by stage on every batch, calling ``on_group`` between stages.

    Args:
        block: a decoder block of the pre-norm shape described by ``table``.
        inputs: the block's inputs (``[b, L, D]`` per batch) and keyword arguments.
        on_group: called with (sub-group index 0..3, statistics of that sub-group's input) once all
            batches have produced the input; it may replace the sub-group's linears in ``block``.
        before: called first for the two norm outputs (sub-groups 0 and 2) with the input per batch; when it
            returns True (it changed the norm or its readers) the input is computed again.

    Returns:
        the block's outputs ``[b, L, D]`` per batch, computed with whatever modules ``on_group`` installed.
        They are the input tensors updated in place: ``inputs.hidden`` is consumed (left empty).
    """
    (norm1, _), (norm2, _) = table.norms
    attn, mlp = get_module(block, table.attention), get_module(block, table.mlp)
    o_proj, down_proj = table.sequential[1][0], table.sequential[3][0]
    # The residual stream is updated in place (h -> h1 -> out): the inputs are consumed, and peak memory
    # is the stream plus the largest branch tensor rather than three copies of the stream.
    hidden = inputs.hidden

    xs = [get_module(block, norm1)(h) for h in hidden]
    if before is not None and before(0, xs, inputs.kwargs):
        xs = [get_module(block, norm1)(h) for h in hidden]
    on_group(0, _stats(xs, get_module(block, table.sequential[0][0])))
    o_in = _consume(xs, lambda k, x: input_of_linear(block, attn, o_proj, x, inputs.kwargs[k]))
    on_group(1, _stats(o_in, get_module(block, o_proj)))
    _consume(o_in, lambda k, a: hidden[k].add_(get_module(block, o_proj)(a)))  # h1 = h + attn(norm1(h))
    ms = [get_module(block, norm2)(h) for h in hidden]
    if before is not None and before(2, ms, inputs.kwargs):
        ms = [get_module(block, norm2)(h) for h in hidden]
    on_group(2, _stats(ms, get_module(block, table.sequential[2][0])))
    d_in = _consume(ms, lambda k, m: input_of_linear(block, mlp, down_proj, m, {}))
    on_group(3, _stats(d_in, get_module(block, down_proj)))
    _consume(d_in, lambda k, d: hidden[k].add_(get_module(block, down_proj)(d)))  # out = h1 + mlp(norm2(h1))
    inputs.hidden = []
    return hidden
