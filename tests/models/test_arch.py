"""Architecture tables: lookup by model_type and the error that lists the supported types."""

from __future__ import annotations

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


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_llama_layout_families_share_the_table(model_type: str) -> None:
    assert arch_table(model_type) is LLAMA


def test_unknown_type_lists_supported_types() -> None:
    with pytest.raises(LowbitError) as info:
        arch_table("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message
    assert "\n" not in message
    for supported in ARCH_TABLES:
        assert supported in message
