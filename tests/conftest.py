"""Shared fixtures: the real data and tiny model in ../shared, and quantized outputs reused across tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA_DIR = Path(os.environ.get("LOWBIT_DATA_DIR", SHARED / "data"))
STORIES = SHARED / "models" / "stories260K"

# Every default data source points at the local copy (CI and our machines are offline).
os.environ.setdefault("LOWBIT_DATA_DIR", str(DATA_DIR))


# ---- requirements: skipped where something is missing, failed under CI -----------------------------------
#
# A test that needs something the checkout may lack (../shared, the dev extra, the default model's package)
# says so with the marker ``@pytest.mark.requires(condition, what)`` (on a test, or as a module's
# ``pytestmark``), or, where the condition is only known inside a fixture, by calling the ``require`` fixture:
# ``require(condition, what)``. Where ``condition`` is false the test is skipped, unless the environment
# variable CI is set (non-empty): then it fails, naming ``what``, so a green CI run never hides a test that
# did not run.


def require(condition: object, what: str) -> None:
    """Skip the running test unless ``condition`` holds; under CI (``$CI`` non-empty) fail it instead."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"missing: {what} (CI is set, so a missing requirement fails instead of skipping)", pytrace=False)
    pytest.skip(f"missing: {what}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(condition, what): skip unless condition holds (fail under CI), naming what is missing"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply the ``requires`` markers before any fixture is set up (a module fixture may load what is missing)."""
    for mark in item.iter_markers("requires"):
        require(*mark.args, **mark.kwargs)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI any skipped test, whatever skipped it, fails the run: a green CI never hides a test that did not run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if os.environ.get("CI") and skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"CI is set and {skipped} test(s) were skipped: failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(name="require", scope="session")
def require_fixture() -> Callable[[object, str], None]:
    """:func:`require` for fixtures and tests whose condition is only known at run time."""
    return require


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def quantized_stories(tmp_path_factory: pytest.TempPathFactory):
    """Quantize stories260K once per preset per session: ``quantized_stories(name) -> (dir, result)``."""
    from lowbit.quantize.pipeline import quantize_model

    cache: dict[str, tuple[Path, object]] = {}

    def get(recipe: str) -> tuple[Path, object]:
        if recipe not in cache:
            out = tmp_path_factory.mktemp("q") / recipe
            result = quantize_model(STORIES, recipe, out, samples=8, calib_seqlen=64, seed=0, progress=False)
            cache[recipe] = (out, result)
        return cache[recipe]

    return get


def _stored_bytes(out: Path) -> dict[str, int]:
    """Quantized layer -> bytes of its weight tensors in ``out/model.safetensors`` (``<layer>.weight_*``, and the
    int8 / fp8 ``<layer>.weight`` of 8-bit formats), read with safetensors itself, independently of lowbit."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            layer, _, tensor = key.rpartition(".")
            codes = tensor == "weight" and f.get_slice(key).get_dtype() in ("I8", "F8_E4M3", "F8_E5M2")
            if layer and (tensor.startswith("weight_") or codes):
                sizes[layer] = sizes.get(layer, 0) + f.get_tensor(key).nbytes
    return sizes


@pytest.fixture(scope="session")
def stored_bytes():  # type: ignore[no-untyped-def]
    """``stored_bytes(out) -> {layer: bytes}``: what a quantized checkpoint's file holds for each quantized linear."""
    return _stored_bytes


@pytest.fixture(scope="session")
def stored_bits_per_weight():  # type: ignore[no-untyped-def]
    """``stored_bits_per_weight(out) -> float``: 8 x the bytes of every quantized linear in the file over their
    weight count (taken from the report's shapes)."""
    import json

    def bits(out: Path) -> float:
        layers = json.loads((out / "quantize_report.json").read_text())["layers"]
        return 8 * sum(_stored_bytes(out).values()) / sum(l["shape"][0] * l["shape"][1] for l in layers)

    return bits


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    """A random 2-layer float32 Llama with tied embeddings, sizes that have Hadamard matrices (unlike stories260K's
    MLP width 172: hidden 64, MLP 128, 4 heads, 2 KV heads of 16), and stories260K's tokenizer (vocab 512);
    non-unit norm gains so that folding matters."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama") / "m"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
    model.save_pretrained(directory, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, directory / f)
    return directory


@pytest.fixture(scope="session")
def interrupt_while_training() -> Callable[[Path, Path, dict, str, list[str]], None]:
    """``interrupt_while_training(model_dir, tmp_path, recipe, bar, extra_args)``: run ``quantize model`` with
    ``recipe`` (a dict) in a subprocess, send SIGINT once the progress bar named ``bar`` has started, and assert
    that the process failed and left nothing in ``tmp_path`` but the recipe file (no output, no staging leftover)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    def run(model_dir: Path, tmp_path: Path, recipe: dict, bar: str, extra_args: list[str]) -> None:
        path = tmp_path / "r.json"
        path.write_text(json.dumps(recipe))
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "model", str(model_dir), "--recipe", str(path),
                                 "--out", str(out), *extra_args],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
        assert proc.stderr is not None
        seen = ""
        deadline = time.time() + 120
        while f"{bar}:" not in seen and time.time() < deadline:  # the training bar has started
            seen += proc.stderr.read(1)
        assert f"{bar}:" in seen, seen[-2000:]
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=300)[1]  # generous: a loaded machine (niced suite) unwinds slowly
        assert proc.returncode != 0, rest[-2000:]
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name != "r.json"] == []

    return run
