"""End to end on the real stories260K model: every preset quantizes, saves, loads back and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.calibrate.sources import wikitext2_test_text
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quantize.evaluate import perplexity
from lowbit.quantize.pipeline import quantize_model
from lowbit.quantize.report import inspect_dir
from transformers import AutoTokenizer

PRESETS = ["w4a16", "w8a8", "w4a8", "w3a16", "w2a16", "w4a16-rtn",
           "w4a16-nvfp4", "w4a16-mxfp4", "w6a16-fp6", "w8a8-fp8", "w4a8-dgq", "w4a8-fp8"]
# Bounds by bits: 8-bit grids barely move the logits, 6-bit ones a little, 4-bit ones (INT4 and FP4 alike) as
# much as the INT4 presets, lower widths more.
MAX_REL_LOGIT_ERR = {"w8a8": 0.05, "w4a16": 0.35, "w4a8": 0.35, "w4a16-rtn": 0.35, "w3a16": 0.6, "w2a16": 1.0,
                     "w8a8-fp8": 0.1, "w6a16-fp6": 0.15, "w4a16-nvfp4": 0.35, "w4a16-mxfp4": 0.35,
                     "w4a8-dgq": 0.35, "w4a8-fp8": 0.35}


@pytest.fixture(scope="module")
def float_model(stories_dir: Path):
    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("recipe", PRESETS)
def test_preset_end_to_end(recipe: str, quantized_stories, float_model, stories_dir: Path) -> None:
    out, result = quantized_stories(recipe)
    assert {"config.json", "model.safetensors", "tokenizer.json", "quantize_report.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary directory left behind"
    model = lowbit.load(out)
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 5 * 7  # every linear of the 5 blocks; the tied lm_head stays float
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = float_model(ids).logits, model(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < MAX_REL_LOGIT_ERR[recipe]
    # The report agrees with the checkpoint.
    report = json.loads((out / "quantize_report.json").read_text())
    assert len(report["layers"]) == 35
    assert all(0 <= l["output_rel_err"] < 1 for l in report["layers"])
    assert report["bits_per_weight"] == pytest.approx(result.bits_per_weight)
    assert result.size_after < result.size_before


def test_w4_quality_on_text(quantized_stories, float_model, stories_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(stories_dir)
    text = wikitext2_test_text()[:20000]
    base = perplexity(float_model, tok, text, seqlen=256, limit=4, progress=False)["ppl"]
    q = perplexity(lowbit.load(quantized_stories("w4a16")[0]), tok, text, seqlen=256, limit=4, progress=False)["ppl"]
    w8 = perplexity(lowbit.load(quantized_stories("w8a8")[0]), tok, text, seqlen=256, limit=4, progress=False)["ppl"]
    assert abs(w8 - base) < 0.03 * base  # 8-bit barely moves perplexity (either way: it is noise)
    assert base < q < base * 1.6


def test_gptq_beats_rtn_on_text(tmp_path: Path, float_model, stories_dir: Path) -> None:
    """With enough calibration tokens (32 x 128 here; the shared fixture's 512 tokens would let GPTQ
    overfit a 64-input layer), the GPTQ preset improves on round-to-nearest of the same grid."""
    tok = AutoTokenizer.from_pretrained(stories_dir)
    text = wikitext2_test_text()[:20000]
    ppl = {}
    for recipe in ("w4a16", "w4a16-rtn"):
        quantize_model(stories_dir, recipe, tmp_path / recipe, samples=32, calib_seqlen=128, progress=False)
        ppl[recipe] = perplexity(lowbit.load(tmp_path / recipe), tok, text, seqlen=256, limit=4, progress=False)["ppl"]
    assert ppl["w4a16"] < ppl["w4a16-rtn"]


def test_group_fallback_is_recorded(quantized_stories) -> None:
    out, result = quantized_stories("w4a16")
    info = inspect_dir(out)
    # stories260K: in_features 64 (<= 128: one group per row) and 172 (no power-of-two divisor >= 32)
    assert set(info["group_fallbacks"]) == {l.name for l in result.layers}
    assert all(l.strategy == "channel" for l in result.layers)
    assert "does not divide" in next(iter(info["group_fallbacks"].values()))


def test_same_inputs_same_files(tmp_path: Path, quantized_stories, stories_dir: Path) -> None:
    first, _ = quantized_stories("w4a8")
    second = tmp_path / "again"
    quantize_model(stories_dir, "w4a8", second, samples=8, calib_seqlen=64, seed=0, progress=False)
    for f in sorted(p.name for p in first.iterdir()):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_without_a_c_compiler_the_same_files_and_a_note(
    tmp_path: Path, quantized_stories, stories_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No compiler: GPTQ's column loop runs in torch, says so, and writes the files the C loop writes."""
    first, _ = quantized_stories("w4a16")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    second = tmp_path / "torch-loop"
    quantize_model(stories_dir, "w4a16", second, samples=8, calib_seqlen=64, seed=0, progress=True)
    assert "no C compiler" in capsys.readouterr().err
    for f in sorted(p.name for p in first.iterdir()):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_error_propagation_uses_quantized_inputs(tmp_path: Path, stories_dir: Path) -> None:
    """A different seed changes the calibration windows and so the reported errors, but not RTN's codes."""
    a = quantize_model(stories_dir, "w4a16-rtn", tmp_path / "a", samples=4, calib_seqlen=64, seed=0, progress=False)
    b = quantize_model(stories_dir, "w4a16-rtn", tmp_path / "b", samples=4, calib_seqlen=64, seed=1, progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert [l.output_rel_err for l in a.layers] != [l.output_rel_err for l in b.layers]


def test_overwrite_replaces_atomically(tmp_path: Path, stories_dir: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(lowbit.LowbitError, match="--overwrite"):
        quantize_model(stories_dir, "w4a16", out, samples=2, calib_seqlen=32, progress=False)
    assert (out / "stale.txt").exists()
    quantize_model(stories_dir, "w4a16", out, samples=2, calib_seqlen=32, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_inspect_names_float_grids(quantized_stories, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.quantize.report import print_inspect

    out, _ = quantized_stories("w4a16-nvfp4")
    print_inspect(inspect_dir(out), top=3)
    text = capsys.readouterr().out
    assert "float4 group 16, activations not quantized [nvfp4-pack-quantized]" in text
    assert "fp4-e2m1 channel e4m3-scales" in text  # the 172-wide down_proj fell back to one block per row
    report = json.loads((out / "quantize_report.json").read_text())
    assert {l["scheme"] for l in report["layers"]} == {"fp4-e2m1 g16 e4m3-scales", "fp4-e2m1 channel e4m3-scales"}
