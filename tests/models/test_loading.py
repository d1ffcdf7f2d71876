"""Loading local HF directories: the happy path on stories260K and one LowbitError per bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import (
    LLAMA,
    check_model_dir,
    get_module,
    load_float_model,
    resolve_model_dir,
    set_module,
)
from lowbit.models import loading

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"

needs_stories = pytest.mark.requires(STORIES.is_dir(), f"the shared model {STORIES}")


@pytest.fixture
def stories_copy(tmp_path: Path) -> Path:
    """A writable copy of stories260K that a test may break."""
    return Path(shutil.copytree(STORIES, tmp_path / "stories"))


def _edit_config(model_dir: Path, **changes: object) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _raises_one_line(fn: Callable[[], object], *fragments: str) -> str:
    """Call ``fn``, require a one-line LowbitError containing every fragment, return the message."""
    with pytest.raises(LowbitError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- get_module / set_module ---------------------------------------------------------------------------


def _toy() -> nn.Module:
    block = nn.ModuleDict({"attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4)})})
    return nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList([block, block])})})


def test_get_module_walks_dotted_paths_and_list_indices() -> None:
    root = _toy()
    assert get_module(root, "") is root
    assert get_module(root, "model.layers.1.attn.q_proj") is root["model"]["layers"][1]["attn"]["q_proj"]


@pytest.mark.parametrize("path", ["model.nope", "model.layers.7", "model.layers.0.attn.q_proj.weight"])
def test_get_module_missing_path(path: str) -> None:
    _raises_one_line(lambda: get_module(_toy(), path), repr(path))


def test_set_module_replaces_in_place() -> None:
    root = _toy()
    new = nn.Identity()
    set_module(root, "model.layers.0.attn.q_proj", new)
    assert get_module(root, "model.layers.0.attn.q_proj") is new
    set_module(root, "model.layers.1", nn.Identity())
    assert isinstance(root["model"]["layers"][1], nn.Identity)


@pytest.mark.parametrize("path", ["", "model.layers.0.attn.k_proj", "model.nope.q_proj"])
def test_set_module_rejects_missing_paths(path: str) -> None:
    root = _toy()
    _raises_one_line(lambda: set_module(root, path, nn.Identity()))
    assert "k_proj" not in root["model"]["layers"][0]["attn"]


# --- the happy path ----------------------------------------------------------------------------------------


@needs_stories
def test_load_stories260k() -> None:
    model, tokenizer, table, path = load_float_model(STORIES)
    assert path == STORIES.resolve()
    assert table is LLAMA
    assert not model.training
    assert model.config.model_type == "llama"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied

    q_proj = get_module(model, "model.layers.3.self_attn.q_proj")
    assert isinstance(q_proj, nn.Linear) and tuple(q_proj.weight.shape) == (64, 64)
    assert tuple(get_module(model, "model.layers.0.mlp.up_proj").weight.shape) == (172, 64)

    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


@needs_stories
def test_load_with_dtype_override() -> None:
    model, _, _, _ = load_float_model(str(STORIES), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@needs_stories
def test_check_model_dir_returns_config() -> None:
    config = check_model_dir(STORIES)
    assert config["model_type"] == "llama" and config["hidden_size"] == 64


def test_alias_and_none_resolve_to_the_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loading, "materialize_smollm2", lambda: tmp_path)
    assert resolve_model_dir(None) == tmp_path
    assert resolve_model_dir("smollm2-135m") == tmp_path
    assert resolve_model_dir("SmolLM2-135M") == tmp_path


# --- bad inputs --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    _raises_one_line(lambda: resolve_model_dir(tmp_path / "nope"), "not a local directory", "smollm2-135m")


def test_hub_id_is_not_downloaded() -> None:
    hub_id = "HuggingFaceTB/SmolLM2-135M"
    _raises_one_line(lambda: load_float_model(hub_id), "not a local directory", "smollm2-135m")


def test_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    _raises_one_line(lambda: load_float_model(file), "is a file")


def test_no_config_json(tmp_path: Path) -> None:
    _raises_one_line(lambda: load_float_model(tmp_path), "no config.json")


@needs_stories
def test_bad_json(stories_copy: Path) -> None:
    (stories_copy / "config.json").write_text('{"model_type": "llama",')
    _raises_one_line(lambda: load_float_model(stories_copy), "not valid JSON")


@needs_stories
def test_config_not_an_object(stories_copy: Path) -> None:
    (stories_copy / "config.json").write_text("[1, 2]")
    _raises_one_line(lambda: check_model_dir(stories_copy), "JSON object")


@needs_stories
def test_config_without_model_type(stories_copy: Path) -> None:
    config = json.loads((stories_copy / "config.json").read_text())
    del config["model_type"]
    (stories_copy / "config.json").write_text(json.dumps(config))
    _raises_one_line(lambda: check_model_dir(stories_copy), "no model_type")


@needs_stories
def test_unsupported_model_type(stories_copy: Path) -> None:
    _edit_config(stories_copy, model_type="gpt2")
    _raises_one_line(lambda: load_float_model(stories_copy), "'gpt2'", "supported: ", "llama")


@needs_stories
def test_only_pickle_weights(stories_copy: Path) -> None:
    (stories_copy / "model.safetensors").rename(stories_copy / "pytorch_model.bin")
    _raises_one_line(lambda: load_float_model(stories_copy), "pytorch_model.bin", "safetensors only")


def test_no_weights_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _raises_one_line(lambda: check_model_dir(tmp_path), "no *.safetensors")


@needs_stories
@pytest.mark.parametrize("keep", [0, 7, 100, 5000])
def test_truncated_safetensors(stories_copy: Path, keep: int) -> None:
    weights = stories_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    _raises_one_line(lambda: load_float_model(stories_copy), "model.safetensors", "truncated or corrupt")


@needs_stories
def test_index_names_missing_shard(stories_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (stories_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises_one_line(lambda: check_model_dir(stories_copy), "model-00002-of-00002.safetensors")


@needs_stories
def test_weights_that_contradict_the_config(stories_copy: Path) -> None:
    _edit_config(stories_copy, intermediate_size=180)
    _raises_one_line(lambda: load_float_model(stories_copy), "could not load")


@needs_stories
def test_weights_missing_from_checkpoint(stories_copy: Path) -> None:
    _edit_config(stories_copy, num_hidden_layers=6)  # layer 5 would be randomly initialised
    _raises_one_line(lambda: load_float_model(stories_copy), "model.layers.5.")


@needs_stories
def test_unknown_device() -> None:
    _raises_one_line(lambda: load_float_model(STORIES, device="tpu9"), "unknown device")
