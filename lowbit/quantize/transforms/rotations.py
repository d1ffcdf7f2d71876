"""Hadamard rotations of the residual stream (R1), the attention heads (R2), Q/K after RoPE (R3) and the
down_proj input (R4), and the RMSNorm gain folding that R1 needs (ALGORITHMS.md 12.1).

Row convention, as in ALGORITHMS.md: an activation row ``x`` becomes ``x Q`` for an orthogonal ``Q``; a torch
weight ``W [out, in]`` that reads the rotated stream becomes ``W Q`` (input side, ``y = x Q (W Q)^T = x W^T``) and
one that writes into it ``Q^T W`` (output side, ``y Q = x (Q^T W)^T``). ``Q = diag(s) H / sqrt(n)`` is
formats/hadamard.py's Hadamard of order n with seeded signs ``s`` (all ones unless ``random``), applied with
its O(n log n) butterfly, never as a dense matrix. Fused products are computed in float64 and rounded once to
the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import block_hadamard, has_hadamard, random_signs
from lowbit.kernels.online import INPUT, K_CACHE, Q_ATTN, OnlineHadamard, TransformedLinear
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.attention import ATTENTION
from lowbit.models.loading import get_module, set_module
from lowbit.quantize.transforms.base import MODEL, Scope, register


def _signs(n: int, random: bool, seed: int) -> torch.Tensor | None:
    return random_signs(n, seed) if random else None


def _update(p: torch.Tensor, fn) -> None:  # type: ignore[no-untyped-def]
    """``p.data <- fn(p in float64)``, rounded once to ``p``'s dtype."""
    with torch.no_grad():
        p.data.copy_(fn(p.data.double()).to(p.dtype))


def rotate_input_side(W: torch.Tensor, block: int, signs: torch.Tensor | None) -> torch.Tensor:
    """``W [out, in] -> W Q`` with ``Q`` block-diagonal Hadamard of order ``block`` (float64 in, float64 out)."""
    return block_hadamard(W, block, signs)


def rotate_output_side(W: torch.Tensor, block: int, signs: torch.Tensor | None) -> torch.Tensor:
    """``W [out, in] -> Q^T W`` (``(W^T Q)^T``), for the weight of a linear whose output is rotated."""
    return block_hadamard(W.T, block, signs).T


def is_tied(model: PreTrainedModel, table: ArchTable) -> bool:
    """True if lm_head and the embedding share storage (the config flag is not trusted: ALGORITHMS.md 12.3)."""
    return get_module(model, table.lm_head).weight.data_ptr() == get_module(model, table.embed).weight.data_ptr()


def untie(model: PreTrainedModel, table: ArchTable) -> None:
    """Give lm_head its own copy of a shared embedding matrix and record ``tie_word_embeddings: false``."""
    if is_tied(model, table):
        head = get_module(model, table.lm_head)
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    setattr(model.config, table.tie_word_embeddings, False)


def _check_rmsnorm(table: ArchTable) -> None:
    if table.norm_kind != "rmsnorm":
        raise LowbitError(f"rotations need RMSNorm (no bias) to commute with the norm; this model's norm is {table.norm_kind}")


@register("fold_norms", MODEL, description="fold every RMSNorm gain into the linears that read it (gains become 1)")
def fold_norms(model: PreTrainedModel, table: ArchTable, geometry: Geometry, scope: Scope) -> None:
    """``W[:, j] *= gamma[j]`` for every reader of a norm, then ``gamma = 1``; the final norm folds into lm_head,
    which is untied from the embedding first when they share storage."""
    _check_rmsnorm(table)

    def fold(norm: nn.Module, readers: list[nn.Module]) -> None:
        gain = getattr(norm, table.norm_gain)
        for r in readers:
            _update(r.weight, lambda W: W * gain.data.double())
        with torch.no_grad():
            gain.data.fill_(1.0)

    for block in scope.blocks:
        for norm, readers in table.norms:
            fold(get_module(block, norm), [get_module(block, r) for r in readers])
    if scope.head:
        untie(model, table)
        fold(get_module(model, table.final_norm), [get_module(model, table.lm_head)])


@register("r1", MODEL, options=("random", "seed"), needs=("fold_norms",),
          description="Hadamard rotation of the residual stream, fused into the embedding and every linear")
def rotate_residual(
    model: PreTrainedModel, table: ArchTable, geometry: Geometry, scope: Scope, random: bool, seed: int
) -> None:
    """R1: the embedding rows and every reader (and lm_head) ``W <- W Q``, every writer ``W <- Q^T W``."""
    n = geometry.hidden
    s = _signs(n, random, seed)
    if scope.head:
        if is_tied(model, table):
            raise LowbitError("r1 needs lm_head untied from the embedding: list fold_norms before it")
        _update(get_module(model, table.embed).weight, lambda E: rotate_input_side(E, n, s))
        _update(get_module(model, table.lm_head).weight, lambda W: rotate_input_side(W, n, s))
    for block in scope.blocks:
        for r in table.readers:
            _update(get_module(block, r).weight, lambda W: rotate_input_side(W, n, s))
        for w in table.writers:
            linear = get_module(block, w)
            _update(linear.weight, lambda W: rotate_output_side(W, n, s))
            if linear.bias is not None:
                _update(linear.bias, lambda b: rotate_input_side(b[None], n, s)[0])


@register("r2", MODEL, options=("random", "seed"),
          description="per-KV-head Hadamard rotation fused into v_proj's outputs and o_proj's inputs")
def rotate_heads(model: PreTrainedModel, table: ArchTable, geometry: Geometry, scope: Scope, random: bool, seed: int) -> None:
    """R2: each head's value ``v^h <- v^h Q`` (v_proj rows of the head ``<- Q^T W``), and o_proj's columns of every
    query head ``<- W Q`` (the same Q for every head, so grouped-query attention needs no bookkeeping)."""
    d = geometry.head_dim
    s = _signs(d, random, seed)
    for block in scope.blocks:
        v, o = get_module(block, table.value), get_module(block, table.out)
        # v_proj rows are [kv_heads * d]: rotating each head's rows is a block-diagonal output-side rotation
        _update(v.weight, lambda W: rotate_output_side(W, d, s))
        if v.bias is not None:
            _update(v.bias, lambda b: rotate_input_side(b[None], d, s)[0])
        _update(o.weight, lambda W: rotate_input_side(W, d, s))


@register("r3", MODEL, options=("random", "seed"), online=True,
          description="online Hadamard on Q and K after RoPE (QK^T unchanged), for a quantized KV cache")
def rotate_qk(model: PreTrainedModel, table: ArchTable, geometry: Geometry, scope: Scope, random: bool, seed: int) -> None:
    """R3: ``R3_q_attn`` and ``R3_k_cache`` children on every attention module, run by models/attention.py."""
    d = geometry.head_dim
    s = _signs(d, random, seed)
    for block in scope.blocks:
        attn = get_module(block, table.attention)
        attn.add_module(f"R3_{Q_ATTN}", OnlineHadamard(d, s))
        attn.add_module(f"R3_{K_CACHE}", OnlineHadamard(d, s))
    if scope.head:
        model.set_attn_implementation(ATTENTION)


@register("r4", MODEL, options=("random", "seed", "block"), online=True,
          description="online Hadamard on the down_proj input, its transpose fused into down_proj")
def rotate_down(
    model: PreTrainedModel, table: ArchTable, geometry: Geometry, scope: Scope, random: bool, seed: int,
    block: int | None,
) -> None:
    """R4: ``x <- x Q`` in front of down_proj (an ``R4_input`` child) and ``W_down <- W_down Q``."""
    b, s = r4_rotation(geometry, block, random, seed)
    for layer in scope.blocks:
        down = get_module(layer, table.down)
        _update(down.weight, lambda W: rotate_input_side(W, b, s))
        set_module(layer, table.down, TransformedLinear.wrap(down, f"R4_{INPUT}", OnlineHadamard(b, s)))


def r4_rotation(geometry: Geometry, block: int | None, random: bool, seed: int) -> tuple[int, torch.Tensor | None]:
    """(order, signs or None) of R4's block-diagonal Hadamard: ``block``, else the full MLP width."""
    b = block or geometry.intermediate
    return b, _signs(b, random, seed)


def rotation_sizes(name: str, geometry: Geometry, block: int | None) -> list[tuple[str, int]]:
    """(what, order) of the Hadamard matrices transform ``name`` needs on a model of ``geometry``."""
    return {
        "r1": [("hidden_size", geometry.hidden)],
        "r2": [("head_dim", geometry.head_dim)],
        "r3": [("head_dim", geometry.head_dim)],
        "r4": [("intermediate_size" if block is None else "r4 block", block or geometry.intermediate)],
    }.get(name, [])


def check_sizes(name: str, geometry: Geometry, block: int | None) -> None:
    """One line if transform ``name`` needs a Hadamard order this model's sizes do not have (before loading)."""
    if name == "r4" and block is not None and geometry.intermediate % block:
        raise LowbitError(f"r4: block {block} does not divide intermediate_size {geometry.intermediate}")
    for what, n in rotation_sizes(name, geometry, block):
        if not has_hadamard(n):
            raise LowbitError(f"{name}: no Hadamard matrix of order {n} ({what}) can be built: orders are K * 2^m with "
                              "K 1, or 12, 20, 28, 36, 44... (Paley); use another transform or an r4 block")
