"""Our INT checkpoints load in transformers + compressed-tensors and give the logits lowbit.load gives."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit

pytestmark = pytest.mark.requires(
    importlib.util.find_spec("compressed_tensors") is not None, "the compressed-tensors package (the dev extra)"
)


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


def _llama(directory, stories_dir, dtype: torch.dtype, hidden: int, intermediate: int):  # type: ignore[no-untyped-def]
    """A random 2-layer Llama saved in ``dtype`` with stories260K's tokenizer (vocab 512)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(directory, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, directory / f)
    return directory


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, stories_dir):  # type: ignore[no-untyped-def]
    """``tiny_llama(dtype)``: a Llama of ``dtype`` whose linears take 32- and 64-column groups (inputs 128 and
    256; stories260K's 172-wide MLP falls back to one scale per row everywhere)."""
    made: dict[torch.dtype, object] = {}

    def get(dtype: torch.dtype):  # type: ignore[no-untyped-def]
        if dtype not in made:
            made[dtype] = _llama(tmp_path_factory.mktemp("tiny") / str(dtype), stories_dir, dtype, 128, 256)
        return made[dtype]

    return get


def _int_recipe(name: str):  # type: ignore[no-untyped-def]
    """A GPTQ recipe named like ``int4-g32-asym`` or ``int3-g64-sym``."""
    from lowbit.formats.scheme import WeightScheme
    from lowbit.quantize.recipe import GPTQ_BEST, PRESETS, Recipe

    if name in PRESETS:
        return PRESETS[name]
    bits, group, sym = name.split("-")
    return Recipe(name, weights=WeightScheme(bits=int(bits[3:]), strategy="group", group_size=int(group[1:]),
                                             symmetric=sym == "sym"), method="gptq", rounding=GPTQ_BEST)


def _quantize_and_compare(model_dir, recipe: str, out, theirs_kwargs: dict) -> None:  # type: ignore[no-untyped-def]
    """Quantize, load with lowbit and with transformers + compressed-tensors: the same weights, bit for bit,
    and the same logits."""
    from lowbit.kernels.quant_linear import QuantLinear
    from lowbit.quantize.pipeline import quantize_model

    quantize_model(model_dir, _int_recipe(recipe), out, samples=8, calib_seqlen=64, seed=0, progress=False)
    ours = lowbit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, **theirs_kwargs).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()  # compressed-tensors decompresses by now
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(theirs.get_submodule(name).weight, layer.dequantized_weight()), name
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the same weights: float32 summation order only


@pytest.mark.parametrize("recipe", ["w4a16", "int4-g32-sym", "int3-g64-sym", "int2-g32-sym"])
def test_grouped_float32_checkpoints_match_in_transformers(recipe: str, tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A float32 model's grouped INT weights with float16 scales, as transformers + compressed-tensors loads them
    by default (``weight_scale`` parameters in float32, exact products): our weights bit for bit (3-bit: the dense
    cross-word packing)."""
    out = tmp_path / recipe
    _quantize_and_compare(tiny_llama(torch.float32), recipe, out, {})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["scale_dtype"] for g in qc["config_groups"].values()} == {"torch.float16"}
    assert {g["weights"]["group_size"] for g in qc["config_groups"].values()} == {128 if recipe == "w4a16" else int(recipe.split("-g")[1][:2])}


@pytest.mark.parametrize("recipe", ["int4-g32-asym", "int4-g64-asym", "int3-g32-asym", "w2a16"])
def test_grouped_asymmetric_checkpoints_match_in_transformers(recipe: str, tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Grouped INT weights with zero points (packed along the rows), through compressed-tensors' decompressor.

    transformers' default load of any asymmetric pack-quantized checkpoint is broken in compressed-tensors
    0.18 - 0.20.1: it compresses the model on the meta device without packing ``weight_zero_point``, so the
    checkpoint's packed zero points mismatch and are re-initialised with a warning. Its ``dequantize=True`` load
    decompresses each checkpoint weight with compressed-tensors itself, in the scale dtype: on this bfloat16 model
    (scales in bfloat16) that is exactly our rule, so the weights must agree bit for bit.
    """
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / recipe
    _quantize_and_compare(tiny_llama(torch.bfloat16), recipe, out, {"quantization_config": CompressedTensorsConfig(dequantize=True)})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not any(g["weights"]["symmetric"] for g in qc["config_groups"].values())


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
    theirs = BaseCompressor.load_from_registry(fmt).decompress(dict(to_buffers(qw)), ct_scheme)["weight"]
    ours = qw.dequantize()
    if fmt.startswith("mx"):
        assert torch.equal(theirs.float(), ours)
    else:
        torch.testing.assert_close(theirs.float(), ours, rtol=2.0**-8, atol=0.0)
        assert not torch.equal(theirs.float(), torch.zeros_like(ours))


@pytest.fixture(scope="module")
def tiny_bf16_llama(tmp_path_factory: pytest.TempPathFactory, stories_dir):  # type: ignore[no-untyped-def]
    """A random bfloat16 Llama whose every linear has 16- and 32-column blocks (stories260K's MLP has 172 inputs)."""
    return _llama(tmp_path_factory.mktemp("tiny") / "llama", stories_dir, torch.bfloat16, 64, 192)


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
