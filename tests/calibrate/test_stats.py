"""InputStats: the lower-triangle Hessian accumulation equals X^T X / n and reads back exactly symmetric."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibrate.stats import InputStats, triangle_blocks


@pytest.mark.parametrize("d", [8, 37, 96, 200, 576, 1536])
def test_triangle_blocks_partition(d: int) -> None:
    b = triangle_blocks(d)
    assert b[0] == 0 and b[-1] == d and all(x < y for x, y in zip(b, b[1:]))
    assert all(x % 16 == 0 for x in b[1:-1])


@pytest.mark.parametrize("d", [37, 200, 576, 1536])
def test_hessian_matches_full_product(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    xs = [torch.randn(2, 40, d, generator=g) * torch.rand(d, generator=g) for _ in range(3)]
    stats = InputStats(d, "cpu", absmax=True)
    for x in xs:
        stats.add(x)
    X = torch.cat([x.reshape(-1, d) for x in xs]).double()
    expected = X.T @ X / X.shape[0]
    H = stats.hessian()
    assert H.dtype == torch.float32 and stats.n_tokens == X.shape[0]
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(stats.absmax, X.abs().amax(0).float())
    assert InputStats(d, "cpu").absmax is None  # off unless asked: nothing in GPTQ or BAQ reads it
