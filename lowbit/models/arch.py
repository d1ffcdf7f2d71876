"""Architecture tables: where the blocks, norms, linears and heads of a decoder-only model live.

Model knowledge is data (DESIGN.md principle 5): algorithms ask a table for module paths and never
branch on the model class. A table is looked up by the Hugging Face ``config.model_type``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ArchTable:
    """Module paths of one decoder-only architecture, relative to the ``*ForCausalLM`` model.

    Attributes:
        blocks: path of the ``nn.ModuleList`` of decoder blocks.
        embed: path of the token embedding.
        final_norm: path of the norm after the last block.
        lm_head: path of the output projection (may be tied to ``embed``).
        rotary: path of the rotary-embedding module that makes ``position_embeddings`` (or "").
        sequential: the linears of one block (paths relative to the block) in true-sequential sub-groups:
            each sub-group is quantized after the previous ones, and the linears inside a sub-group read
            the same input tensor, so they share one Hessian.
        norms: for each pre-norm (path relative to the block), the linears that read its output; the
            transforms use this to fold scalings into the norm gain.
        attention, mlp: the two residual branches of the pre-norm block
            ``h = h + attention(norms[0](h)); h = h + mlp(norms[1](h))``, whose last linears are the only
            members of ``sequential[1]`` and ``sequential[3]``. The staged runner relies on this shape to
            quantize true-sequentially in a single pass over the calibration data.
        writers: the linears of a block that write into the residual stream (their outputs are added to it);
            a residual rotation R1 is fused on their output side (``W <- R1^T W``).
        readers: the linears of a block that read the (normalised) residual stream; R1 is fused on their input
            side (``W <- W R1``). The model's ``lm_head`` reads it too, after ``final_norm``.
        norm_kind: "rmsnorm" (``x / rms(x) * gain``, no bias): only this kind commutes with an orthogonal
            rotation once its gain is folded into the readers.
        norm_gain: attribute of a norm module that holds its gain vector ``[hidden]``.
        value, out: the attention's value and output projections (paths relative to the block): the per-head
            rotation R2 and SmoothQuant's v->o scaling act on v's output rows and o's input columns.
        down, up: the MLP's down projection (whose input takes the online rotation R4) and the up projection
            (linear in the down projection's input: ``down(act(gate(x)) * up(x))``).
        query, key: the attention's query and key projections (OSTQuant's q -> k scaling acts on their rows).
        rope_pairs: which channels of a head RoPE rotates together: "half" (``i`` with ``i + head_dim/2``, the HF
            ``rotate_half`` layout), "interleaved" (``2i`` with ``2i + 1``) or "none". A q -> k scaling equal on
            both channels of every pair commutes with RoPE, so it is exact.
        qk_norm: the attention normalises q and k per head after projecting (Qwen3): a q -> k scaling would be
            undone by that norm, so none is learned.
        heads, kv_heads, head_dim: config keys of the head geometry (``head_dim`` falls back to
            ``hidden / heads`` when the config has none).
        hidden, intermediate: config keys of the residual width and the MLP width.
        tie_word_embeddings: the config key that says whether ``lm_head`` shares the embedding's storage. The
            transforms decide tying by shared storage, not by this flag, and write ``False`` when they untie.
    """

    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    norms: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    attention: str = "self_attn"
    mlp: str = "mlp"
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    readers: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
    )
    norm_kind: str = "rmsnorm"
    norm_gain: str = "weight"
    value: str = "self_attn.v_proj"
    out: str = "self_attn.o_proj"
    down: str = "mlp.down_proj"
    up: str = "mlp.up_proj"
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    rope_pairs: str = "half"
    qk_norm: bool = False
    heads: str = "num_attention_heads"
    kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"
    hidden: str = "hidden_size"
    intermediate: str = "intermediate_size"
    tie_word_embeddings: str = "tie_word_embeddings"

    def geometry(self, config: dict[str, Any]) -> "Geometry":
        """The sizes rotations need, read from a model's ``config.json`` dict (a LowbitError if one is missing)."""
        try:
            hidden, heads = int(config[self.hidden]), int(config[self.heads])
            kv_heads = int(config.get(self.kv_heads) or heads)
            head_dim = int(config.get(self.head_dim) or hidden // heads)
            intermediate = int(config[self.intermediate])
        except (KeyError, TypeError, ValueError) as e:
            raise LowbitError(f"the model config lacks a head or width size the transforms need ({e})") from None
        return Geometry(hidden, intermediate, heads, kv_heads, head_dim)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in processing order."""
        return tuple(name for group in self.sequential for name in group)


@dataclass(frozen=True)
class Geometry:
    """Widths of one model: residual ``hidden``, MLP ``intermediate``; ``heads`` query heads and ``kv_heads``
    key/value heads of ``head_dim`` channels each (``heads`` a multiple of ``kv_heads``)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


LLAMA = ArchTable()

# model_type -> table. Llama, Qwen2, Qwen3 and Mistral share the HF module layout (Qwen3 adds q_norm/k_norm
# inside attention, which hold no linear weight and need no entry).
ARCH_TABLES: dict[str, ArchTable] = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "qwen3": dataclasses.replace(LLAMA, qk_norm=True),
    "mistral": LLAMA,
}


def arch_table(model_type: str) -> ArchTable:
    """Return the table for ``model_type`` or raise a LowbitError listing the supported types."""
    try:
        return ARCH_TABLES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCH_TABLES))
        raise LowbitError(
            f"model type {model_type!r} has no architecture table; supported: {supported}"
        ) from None
