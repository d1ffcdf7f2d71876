"""Our INT checkpoints load in transformers + compressed-tensors and give the logits lowbit.load gives."""

from __future__ import annotations

import pytest
import torch

import lowbit

pytest.importorskip("compressed_tensors", reason="the dev extra installs compressed-tensors")
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8"])
def test_transformers_compressed_tensors_logits_match(recipe: str, quantized_stories) -> None:
    out, _ = quantized_stories(recipe)
    ours = lowbit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    # Same dequantized weights and, for w8a8, the same per-token activation rounding (absmax / 127.5):
    # the two paths do identical float32 arithmetic, so only summation order could differ.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
