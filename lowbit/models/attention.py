"""The attention function for what happens after RoPE: the online Q/K rotation R3 and the quantized KV cache.

transformers' attention modules project, apply RoPE, update the cache, then call the function that
``config._attn_implementation`` names in its attention-function registry with ``(module, query, key, value,
mask, ...)``, where query is ``[b, heads, L, head_dim]`` and key/value are ``[b, kv_heads, L_kv, head_dim]``.
lowbit registers :func:`lowbit_attention` there (no patched forward): it rotates query and key with the module's
``*_q_attn`` / ``*_k_cache`` online transforms (kernels/online.py; ``q H (k H)^T = q k^T``), quantizes key and value
as the module's ``kv_cache_scheme`` says (per token and head: a group of ``head_dim``), then runs PyTorch's
scaled-dot-product attention through transformers' own ``sdpa`` function.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lowbit.formats.scheme import ActScheme
from lowbit.kernels.online import K_CACHE, Q_ATTN, online_child
from lowbit.kernels.quant_linear import fake_quantize_activation

ATTENTION = "lowbit"
KV_ATTR = "kv_cache_scheme"  # attribute of an attention module: its ActScheme for K and V, or absent/None
KV_STE_ATTR = "kv_cache_ste"  # attribute set True while a transform trains through the KV quantizer (straight-through)


def lowbit_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature: R3 on query and key, K/V quantization, then SDPA."""
    q_t, k_t = online_child(module, Q_ATTN), online_child(module, K_CACHE)
    if q_t is not None:
        query = q_t[1](query)
    if k_t is not None:
        key = k_t[1](key)
    kv: ActScheme | None = getattr(module, KV_ATTR, None)
    if kv is not None:
        ste = bool(getattr(module, KV_STE_ATTR, False))
        key, value = fake_quantize_activation(key, kv, ste), fake_quantize_activation(value, kv, ste)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, lowbit_attention)


def attention_modules(model: nn.Module, blocks: str, attention: str) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every block's attention module."""
    layers = model.get_submodule(blocks)
    return [(f"{blocks}.{i}.{attention}", block.get_submodule(attention)) for i, block in enumerate(layers)]


def install_attention(model: PreTrainedModel, modules: list[nn.Module], kv: ActScheme | None) -> None:
    """Give each attention module of ``modules`` the KV scheme ``kv`` (None: a float cache) and switch the model to
    :func:`lowbit_attention` (which also runs the modules' ``*_q_attn`` / ``*_k_cache`` children)."""
    for m in modules:
        setattr(m, KV_ATTR, kv)
    model.set_attn_implementation(ATTENTION)


@contextmanager
def kv_cache_mode(modules: list[nn.Module], quantize: bool = True, ste: bool = False) -> Iterator[None]:
    """Within the block, the attention modules among ``modules`` quantize their KV cache as installed
    (``quantize``) or not at all (a float teacher), with straight-through gradients if ``ste`` (training through
    it); their schemes and flags are restored on leaving."""
    attns = [m for m in modules if hasattr(m, KV_ATTR)]
    saved = [(getattr(m, KV_ATTR), getattr(m, KV_STE_ATTR, False)) for m in attns]
    try:
        for m in attns:
            if not quantize:
                setattr(m, KV_ATTR, None)
            setattr(m, KV_STE_ATTR, ste)
        yield
    finally:
        for m, (scheme, flag) in zip(attns, saved):
            setattr(m, KV_ATTR, scheme)
            setattr(m, KV_STE_ATTR, flag)
