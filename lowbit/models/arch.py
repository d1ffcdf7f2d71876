"""Architecture tables: where the blocks, norms, linears and heads of a decoder-only model live.

Model knowledge is data (DESIGN.md principle 5): algorithms ask a table for module paths and never
branch on the model class. A table is looked up by the Hugging Face ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in processing order."""
        return tuple(name for group in self.sequential for name in group)


LLAMA = ArchTable()

# model_type -> table. Llama, Qwen2, Qwen3 and Mistral share the HF module layout (Qwen3 adds q_norm/k_norm
# inside attention, which hold no linear weight and need no entry).
ARCH_TABLES: dict[str, ArchTable] = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
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
