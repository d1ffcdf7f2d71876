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


def test_smollm2_ost_training_keeps_the_float_logits() -> None:
    """OSTQuant trained for a few steps through INT4 activations and KV cache on the real model: the rotations stay
    orthogonal and the float model with the trained transforms fused gives the same logits (1e-4 relative)."""
    import json

    import torch

    from lowbit.calibrate.sources import calibration_texts
    from lowbit.models.attention import attention_modules, install_attention
    from lowbit.quantize.recipe import A4_TOKEN, INT4_G128, KV4
    from lowbit.quantize.transforms.apply import apply_model_transforms, check_model
    from lowbit.quantize.transforms.base import TrainContext
    from lowbit.quantize.transforms.spec import TransformSpec as T

    model, tok, table, directory = load_float_model(None)
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    specs = (T("fold_norms"), T("r3"), T("ost", steps=4, batch=1, seqlen=256), T("r4"))
    geometry = check_model(specs, table, json.loads((directory / "config.json").read_text()))
    attns = [m for _, m in attention_modules(model, table.blocks, table.attention)]
    install_attention(model, attns, KV4)
    ctx = TrainContext(calibration_texts(None), tok, INT4_G128.for_model([576, 1536]), A4_TOKEN, KV4, (), "cpu", 0, False)
    report = apply_model_transforms(model, table, geometry, specs, ctx)["ost"]
    assert report["orthogonality_error"] < 1e-5
    install_attention(model, attns, None)
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).norm() / before.norm()) < 1e-4
