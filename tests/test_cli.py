"""The `quantize` command: bad input gives one readable line, a non-zero exit and nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def _fails_with_one_line(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith(("Loading", "\r"))]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert match in errors[0], errors[0]
    assert "Traceback" not in result.output


def _model_copy(stories_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(stories_dir, dst)
    return dst


def test_missing_model_path(tmp_path: Path) -> None:
    _fails_with_one_line(["model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope")
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(stories_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(stories_dir, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    _fails_with_one_line(["model", str(model), "--out", str(tmp_path / "o")], "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_unsupported_model_type(stories_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(stories_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(cfg))
    _fails_with_one_line(["model", str(model), "--out", str(tmp_path / "o")], "llama")


def test_unknown_recipe_and_key(stories_dir: Path, tmp_path: Path) -> None:
    _fails_with_one_line(["model", str(stories_dir), "--recipe", "w9a9", "--out", str(tmp_path / "o")], "w4a16")
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nweights: {bitz: 4}\n")
    _fails_with_one_line(["model", str(stories_dir), "--recipe", str(bad), "--out", str(tmp_path / "o")], "bitz")
    assert not (tmp_path / "o").exists()


def test_calibration_shorter_than_a_window(stories_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "tiny.txt"
    calib.write_text("Once upon a time.")
    _fails_with_one_line(["model", str(stories_dir), "--calib", str(calib), "--out", str(tmp_path / "o")], "shorter than one window")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(stories_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    _fails_with_one_line(["model", str(stories_dir), "--out", str(tmp_path / "o")], "--overwrite")
    assert (tmp_path / "o" / "keep").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_recipes_lists_presets() -> None:
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    presets, _, transforms = result.stdout.partition("\ntransforms")
    names = [line.split()[0] for line in presets.splitlines()]
    assert {"w4a16", "w8a8", "w4a8", "w4a16-rot", "w4a4kv4-rot"} <= set(names)
    assert {"fold_norms", "r1", "r2", "r3", "r4", "smoothquant"} <= {l.split()[0] for l in transforms.splitlines()[1:]}


def test_model_inspect_and_eval(stories_dir: Path, tmp_path: Path, stored_bits_per_weight) -> None:
    out = tmp_path / "q"
    result = runner.invoke(app, ["model", str(stories_dir), "--recipe", "w4a8", "--out", str(out), "--samples", "4", "--calib-seqlen", "64"])
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.stdout and "worst" in result.stdout
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["schemes"][0]["input_activations"]["num_bits"] == 8
    assert len(info["layers"]) == 35 and info["size_after"] < info["size_before"]
    assert info["size_after"] == (out / "model.safetensors").stat().st_size
    assert info["bits_per_weight"] == stored_bits_per_weight(out)  # what inspect prints is what the file holds
    assert f"bits per weight   {stored_bits_per_weight(out):.3f}" in result.stdout
    text = runner.invoke(app, ["inspect", str(out)]).stdout
    assert "group fallbacks" in text and "per-channel" in text
    ppl = runner.invoke(app, ["eval", "ppl", str(out), "--seqlen", "128", "--limit", "2", "--json"])
    assert ppl.exit_code == 0, ppl.output
    res = json.loads(ppl.stdout)
    assert res["seqlen"] == 128 and res["windows"] == 2 and res["ppl"] > 1
    acc = runner.invoke(app, ["eval", "acc", str(out), "--tasks", "piqa,arc_easy", "--limit", "8", "--json"])
    assert acc.exit_code == 0, acc.output
    assert set(json.loads(acc.stdout)) == {"piqa", "arc_easy"}
    assert json.loads(acc.stdout)["piqa"]["n"] == 8


def test_inspect_float_dir_is_a_clear_error(stories_dir: Path) -> None:
    _fails_with_one_line(["inspect", str(stories_dir)], "not quantized")


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from lowbit.cli import main; main()", "model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["model", "--help"])
    for opt in ["--recipe", "--out", "--calib", "--samples", "--calib-seqlen", "--seed", "--device", "--overwrite"]:
        assert opt in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--backend", "cutlass"], "unknown kernel backend"), (["--device", "tpu9"], "unknown device")],
)
def test_eval_device_and_backend_errors(stories_dir: Path, args: list[str], message: str) -> None:
    _fails_with_one_line(["eval", "ppl", str(stories_dir), "--limit", "1", *args], message)
