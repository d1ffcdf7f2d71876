"""End to end on the real stories260K model: every preset quantizes, saves, loads back and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.calibrate.sources import wikitext2_test_text
from lowbit.formats.precision import Precision
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quantize.evaluate import perplexity
from lowbit.quantize import pipeline
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


# Scale dtypes of formats whose scales are not float (in the safetensors header's names).
FIXED_SCALE_DTYPE = {"w4a16-nvfp4": "F8_E4M3", "w4a16-mxfp4": "U8", "w4a8-dgq": "I8", "w4a8-fp8": "F8_E4M3"}


@pytest.fixture(scope="module")
def float_model(stories_dir: Path):
    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("recipe", PRESETS)
def test_preset_end_to_end(recipe: str, quantized_stories, float_model, stories_dir: Path, stored_bytes) -> None:
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
    # The report agrees with the checkpoint: each layer's bits are the bytes its tensors take in the file.
    report = json.loads((out / "quantize_report.json").read_text())
    assert len(report["layers"]) == 35
    assert all(0 <= l["output_rel_err"] < 1 for l in report["layers"])
    stored = stored_bytes(out)
    for l in report["layers"]:
        assert l["bits_per_weight"] == 8 * stored[l["name"]] / (l["shape"][0] * l["shape"][1]), l["name"]
    assert report["bits_per_weight"] == 8 * sum(stored.values()) / report["quantized_params"]
    assert report["bits_per_weight"] == result.bits_per_weight
    assert result.size_after == (out / "model.safetensors").stat().st_size < result.size_before
    # stories260K is float32: float scales are stored in float16 (formats/precision.py), as the recipe says
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scale_dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight_scale")}
    assert scale_dtypes == {FIXED_SCALE_DTYPE.get(recipe, "F16")}


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


def test_error_propagation_uses_quantized_inputs(
    tmp_path: Path, stories_dir: Path, float_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each block is calibrated on the outputs of the already-quantized blocks before it, not the float ones:
    block 1's inputs are what the quantized block 0 (as loaded from the checkpoint) makes of block 0's inputs."""
    seen: dict[int, tuple[list[torch.Tensor], list[dict]]] = {}
    quantize_block = pipeline.quantize_block

    def recording(block, prefix, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen[int(prefix.rsplit(".", 1)[1])] = ([h.clone() for h in inputs.hidden], inputs.kwargs)
        return quantize_block(block, prefix, inputs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_block", recording)
    quantize_model(stories_dir, "w4a16", tmp_path / "q", samples=4, calib_seqlen=64, seed=0, progress=False)
    quantized = lowbit.load(tmp_path / "q")
    hidden, kwargs = seen[0]
    with torch.no_grad():
        for i, (h, kw) in enumerate(zip(hidden, kwargs)):
            through_quantized = quantized.model.layers[0](h, **kw)
            through_float = float_model.model.layers[0](h, **kw)
            through_quantized = through_quantized[0] if isinstance(through_quantized, tuple) else through_quantized
            through_float = through_float[0] if isinstance(through_float, tuple) else through_float
            torch.testing.assert_close(seen[1][0][i], through_quantized, rtol=1e-5, atol=1e-5)
            assert (seen[1][0][i] - through_float).abs().max() > 100 * (seen[1][0][i] - through_quantized).abs().max()


def test_loaded_weights_are_the_simulated_ones(tmp_path: Path, stories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights the pipeline rounded to and ran its calibration forward with are, bit for bit, the weights
    ``lowbit.load`` decodes from the file: float16 scales on this float32 model, the products exact in float32."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    simulated: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    from_quantized = QuantLinear.from_quantized.__func__  # type: ignore[attr-defined]
    quantize_block = pipeline.quantize_block

    def recording_layer(cls, qw, act, dtype, bias=None):  # type: ignore[no-untyped-def]
        assert qw.precision == Precision(torch.float32, torch.float16)
        layer = from_quantized(cls, qw, act, dtype, bias)
        made[id(layer)] = (qw.dequantize(dtype), layer.dequantized_weight().clone())
        return layer

    def recording_block(block, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = quantize_block(block, prefix, *args, **kwargs)
        simulated.update({f"{prefix}.{n}": made[id(m)] for n, m in block.named_modules() if isinstance(m, QuantLinear)})
        return out

    monkeypatch.setattr(QuantLinear, "from_quantized", classmethod(recording_layer))
    monkeypatch.setattr(pipeline, "quantize_block", recording_block)
    for recipe in ("w4a16", "w2a16", "w8a8"):
        out = tmp_path / recipe
        quantize_model(stories_dir, recipe, out, samples=4, calib_seqlen=64, seed=0, progress=False)
        model = lowbit.load(out)
        assert len(simulated) == 35
        for name, (rounded, ran) in simulated.items():
            assert torch.equal(ran, rounded), name
            assert torch.equal(model.get_submodule(name).dequantized_weight(), rounded), name
        simulated.clear()


def test_overwrite_replaces_atomically(tmp_path: Path, stories_dir: Path) -> None:
    out = tmp_path / "o"
    quantize_model(stories_dir, "w4a16", out, samples=2, calib_seqlen=32, progress=False)
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
