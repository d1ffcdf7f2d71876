"""Our INT checkpoints load in transformers + compressed-tensors and give the logits lowbit.load gives."""

from __future__ import annotations

import pytest
import torch

import lowbit

pytest.importorskip("compressed_tensors", reason="the dev extra installs compressed-tensors")
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8", "w8a8-fp8"])
def test_transformers_compressed_tensors_logits_match(recipe: str, quantized_stories) -> None:
    out, _ = quantized_stories(recipe)
    ours = lowbit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    # Same dequantized weights and, for w8a8, the same per-token activation rounding (absmax / 127.5; FP8:
    # absmax / 448 and a round-to-nearest-even cast):
    # the two paths do identical float32 arithmetic, so only summation order could differ.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nvfp4-pack-quantized", "mxfp4-pack-quantized"])
def test_fp4_tensors_decompress_in_compressed_tensors(fmt: str) -> None:
    """Our NVFP4/MXFP4 tensors and config args, decoded by compressed-tensors' own compressor, give our weights.

    stories260K's 172-wide MLP has no 16/32-column blocks, so this checks the layout on one layer instead of
    a whole model. compressed-tensors decompresses FP4 to bfloat16: MXFP4 values (E2M1 times a power of two)
    are exact there, NVFP4's ``s_b / G`` products are rounded once to bfloat16 (relative error <= 2^-8).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from lowbit.formats.checkpoint import LayerScheme, build_quantization_config
    from lowbit.formats.storage import to_buffers
    from lowbit.quantize.recipe import PRESETS
    from lowbit.quantize.rtn import rtn_weight

    scheme = PRESETS["w4a16-nvfp4" if fmt.startswith("nv") else "w4a16-mxfp4"].weights
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    qw = rtn_weight(W, scheme)
    qc = build_quantization_config({"layer": LayerScheme(scheme, None, fmt)}, [], {})
    assert qc["format"] == fmt
    ct_args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])  # exactly the args lowbit writes
    assert ct_args.scale_dtype == (torch.float8_e4m3fn if fmt.startswith("nv") else torch.uint8)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=ct_args)
    theirs = BaseCompressor.load_from_registry(fmt).decompress(dict(to_buffers(qw, torch.float32)), ct_scheme)["weight"]
    ours = qw.dequantize()
    if fmt.startswith("mx"):
        assert torch.equal(theirs.float(), ours)
    else:
        torch.testing.assert_close(theirs.float(), ours, rtol=2.0**-8, atol=0.0)
        assert not torch.equal(theirs.float(), torch.zeros_like(ours))


@pytest.fixture(scope="module")
def tiny_bf16_llama(tmp_path_factory: pytest.TempPathFactory, stories_dir):
    """A random bfloat16 Llama whose every linear has 16- and 32-column blocks (stories260K's MLP has 172 inputs)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, src / f)
    return src


@pytest.mark.parametrize("recipe", ["w4a16-nvfp4", "w4a16-mxfp4"])
def test_fp4_checkpoints_load_in_transformers(recipe: str, tiny_bf16_llama, tmp_path) -> None:
    """A whole NVFP4 / MXFP4 checkpoint, as lowbit writes it, runs in transformers + compressed-tensors with our
    logits (bfloat16: compressed-tensors decompresses FP4 to bfloat16, which is also our model dtype)."""
    from lowbit.quantize.pipeline import quantize_model

    out = tmp_path / recipe
    quantize_model(tiny_bf16_llama, recipe, out, samples=8, calib_seqlen=64, seed=0, progress=False)
    ours = lowbit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    # the same bfloat16 weights through the same modules: identical, as for the INT checkpoints above
    assert torch.equal(a, b)
