"""Architecture tables: lookup by model_type and the error that lists the supported types."""

from __future__ import annotations

import dataclasses

import pytest

from lowbit.errors import LowbitError
from lowbit.models import ARCH_TABLES, LLAMA, ArchTable, arch_table


def test_llama_table_paths() -> None:
    table = arch_table("llama")
    assert table is LLAMA
    assert isinstance(table, ArchTable)
    assert (table.blocks, table.embed, table.final_norm, table.lm_head) == (
        "model.layers",
        "model.embed_tokens",
        "model.norm",
        "lm_head",
    )


def test_llama_linears_in_sequential_order() -> None:
    assert LLAMA.linears == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    # every linear a norm feeds is one of the block's linears
    for _norm, readers in LLAMA.norms:
        assert set(readers) <= set(LLAMA.linears)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_llama_layout_families_share_the_table(model_type: str) -> None:
    assert arch_table(model_type) is LLAMA


def test_qwen3_differs_only_by_its_normalised_q_and_k() -> None:
    """Qwen3 normalises q and k per head after projecting: a learned q -> k scaling would be undone there."""
    qwen3 = arch_table("qwen3")
    assert qwen3.qk_norm and not LLAMA.qk_norm
    assert dataclasses.replace(qwen3, qk_norm=False) == LLAMA


def test_unknown_type_lists_supported_types() -> None:
    with pytest.raises(LowbitError) as info:
        arch_table("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message
    assert "\n" not in message
    for supported in ARCH_TABLES:
        assert supported in message


def test_rotation_roles_cover_every_linear_and_geometry_reads_the_config() -> None:
    """Each linear of a block is a reader or a writer of the residual stream (or o_proj/down_proj); the head
    geometry comes from the config, head_dim defaulting to hidden / heads."""
    from lowbit.errors import LowbitError
    from lowbit.models.arch import LLAMA, Geometry

    assert set(LLAMA.readers) | set(LLAMA.writers) == set(LLAMA.linears)
    assert {LLAMA.value, LLAMA.up} <= set(LLAMA.readers) and {LLAMA.out, LLAMA.down} == set(LLAMA.writers)
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64}
    assert LLAMA.geometry(smol) == Geometry(576, 1536, 9, 3, 64)
    assert LLAMA.geometry({**smol, "head_dim": None, "num_key_value_heads": None}) == Geometry(576, 1536, 9, 9, 64)
    import pytest

    with pytest.raises(LowbitError, match="lacks a head or width size"):
        LLAMA.geometry({"hidden_size": 576})
