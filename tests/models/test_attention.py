"""lowbit's attention function (R3 and the quantized KV cache) and the online Hadamard modules it runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import hadamard_matrix, random_signs
from lowbit.formats.scheme import ActScheme
from lowbit.kernels.online import OnlineHadamard
from lowbit.kernels.quant_linear import fake_quantize_activation
from lowbit.models.attention import KV_ATTR, lowbit_attention

KV4 = ActScheme(bits=4, symmetric=False, clip_ratio=0.95)


class _Attn(nn.Module):
    """The attributes transformers' sdpa function reads from an attention module."""

    is_causal = True

    def __init__(self) -> None:
        super().__init__()
        self.num_key_value_groups = 2
        self.training = False


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 16, 8, generator=g)
    k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    k[..., 3] *= 20  # an outlier channel, as keys have
    return q, k, v


def test_r3_leaves_attention_unchanged() -> None:
    m = _Attn()
    q, k, v = _qkv()
    ref = sdpa_attention_forward(m, q, k, v, None, scaling=8 ** -0.5)[0]
    signs = random_signs(8, 1)
    m.add_module("R3_q_attn", OnlineHadamard(8, signs))
    m.add_module("R3_k_cache", OnlineHadamard(8, signs))
    got = lowbit_attention(m, q, k, v, None, scaling=8 ** -0.5)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kv_cache_is_quantized_per_token_and_head_after_r3() -> None:
    """With R3 and an INT4 KV scheme the function is SDPA on (q H, Q(k H), Q(v)); each token-head of the
    quantized keys takes at most 16 values, and rotating first spreads the outlier (smaller error)."""
    m = _Attn()
    q, k, v = _qkv()
    setattr(m, KV_ATTR, KV4)
    plain = lowbit_attention(m, q, k, v, None, scaling=8 ** -0.5)[0]
    H = OnlineHadamard(8)
    m.add_module("R3_q_attn", H)
    m.add_module("R3_k_cache", OnlineHadamard(8))
    got = lowbit_attention(m, q, k, v, None, scaling=8 ** -0.5)[0]
    k_q = fake_quantize_activation(H(k), KV4)
    assert max(len(row.unique()) for row in k_q.reshape(-1, 8)) <= 16
    want = sdpa_attention_forward(m, H(q), k_q, fake_quantize_activation(v, KV4), None, scaling=8 ** -0.5)[0]
    torch.testing.assert_close(got, want)
    ref = sdpa_attention_forward(m, q, k, v, None, scaling=8 ** -0.5)[0]
    assert (got - ref).norm() < (plain - ref).norm()


def test_online_hadamard_reads_back_what_it_stores() -> None:
    """A stored ``diag(s) H`` is recognised (fast path with the same signs); another orthogonal matrix runs dense;
    a matrix that is not orthogonal once divided by sqrt(n) is refused."""
    x = torch.randn(3, 24)
    src = OnlineHadamard(12, random_signs(12, 4))
    dst = OnlineHadamard(12)
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst(x), src(x))
    assert dst.dense is None and dst.signs is not None and dst.kind == "random-hadamard"
    assert OnlineHadamard(64).kind == "hadamard" and OnlineHadamard(12).kind == "random-hadamard"
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    dst.load_state_dict({"weight": (Q * math.sqrt(12)).float()})  # e.g. written by another tool, in float32
    assert dst.dense is not None and dst.weight.dtype == torch.float32
    torch.testing.assert_close(dst(x), x @ dst.matrix(24).float(), rtol=1e-5, atol=1e-5)
    dst.weight.fill_(1.0)
    with pytest.raises(LowbitError, match="not orthogonal"):
        dst.adopt_weight()
    torch.testing.assert_close(src.matrix(12), torch.diag(random_signs(12, 4)) @ hadamard_matrix(12))
