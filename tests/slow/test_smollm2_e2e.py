"""Slow end-to-end checks on the real SmolLM2-135M (run with `pytest -m slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowbit
from lowbit.calibrate.sources import wikitext2_test_text
from lowbit.models.loading import load_float_model
from lowbit.quantize.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def float_ppl() -> tuple[float, object]:
    model, tok, _, _ = load_float_model(None)
    return perplexity(model, tok, wikitext2_test_text(), seqlen=2048, limit=2, progress=False)["ppl"], tok


@pytest.mark.parametrize(("recipe", "max_ratio"), [("w8a8", 1.03), ("w4a16", 1.6)])
def test_smollm2_preset_perplexity(recipe: str, max_ratio: float, float_ppl, tmp_path: Path) -> None:
    base, tok = float_ppl
    out = tmp_path / recipe
    lowbit.quantize_model(None, recipe, out, samples=16, calib_seqlen=512, progress=False)
    ppl = perplexity(lowbit.load(out), tok, wikitext2_test_text(), seqlen=2048, limit=2, progress=False)["ppl"]
    assert base * 0.98 < ppl < base * max_ratio
