"""--out never destroys data: what --overwrite may replace, checks before the model loads, leftovers of killed
runs, and a failure while writing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.quantize import output, pipeline
from lowbit.quantize.destination import check_destination, move_into_place, remove_leftovers
from lowbit.quantize.pipeline import quantize_model

runner = CliRunner()
SMALL = dict(samples=2, calib_seqlen=32, seed=0, progress=False)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The process id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: the checks under test must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(pipeline, "open_lazy_model", refuse)


def _one_line_exit_2(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [("--batch-size", "0", "--batch-size must be an integer >= 1"), ("--samples", "0", "--samples must be an integer >= 1"),
     ("--calib-seqlen", "1", "--calib-seqlen must be an integer >= 2"),
     ("--calib-seqlen", "513", "exceeds the model's max_position_embeddings (512)")],
)
def test_bad_sizes_fail_before_loading(
    option: str, value: str, match: str, stories_dir: Path, tmp_path: Path, no_model_load: None
) -> None:
    out = tmp_path / "sub" / "o"
    _one_line_exit_2(["model", str(stories_dir), "--out", str(out), option, value], match)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the parent


def test_parent_must_be_a_writable_directory(stories_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    (tmp_path / "file").write_text("x")
    _one_line_exit_2(["model", str(stories_dir), "--out", str(tmp_path / "file" / "o")], "is not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    # root ignores permission bits; an immutable directory refuses new entries even to root (ext4, xfs...)
    flag = ["chattr", "+i", str(locked)] if os.geteuid() == 0 else ["chmod", "0500", str(locked)]
    subprocess.run(flag, check=True)
    try:
        _one_line_exit_2(["model", str(stories_dir), "--out", str(locked / "new" / "o")], "is not writable")
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)] if os.geteuid() == 0 else ["chmod", "0700", str(locked)], check=True)


def test_overwrite_refuses_what_is_not_an_output(stories_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    _one_line_exit_2(["model", str(stories_dir), "--out", str(notes), "--overwrite"], "neither")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    _one_line_exit_2(["model", str(stories_dir), "--out", str(a_file), "--overwrite"], "neither")
    assert (notes / "todo.txt").read_text() == "mine" and a_file.read_text() == "mine"


def test_overwrite_never_touches_the_model_home_or_root(
    stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_load: None
) -> None:
    model = tmp_path / "models" / "stories"
    shutil.copytree(stories_dir, model)
    (model / "quantize_report.json").write_text("{}")  # even looking like an output does not make it one
    before = _tree(tmp_path)
    _one_line_exit_2(["model", str(model), "--out", str(model), "--overwrite"], "is the model directory")
    _one_line_exit_2(["model", str(model), "--out", str(model.parent), "--overwrite"], "contains the model directory")
    _one_line_exit_2(["model", str(model), "--out", str(tmp_path), "--overwrite"], "contains the model directory")
    home = tmp_path / "home"
    home.mkdir()
    (home / "quantize_report.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    _one_line_exit_2(["model", str(model), "--out", str(home), "--overwrite"], "is the home directory")
    _one_line_exit_2(["model", str(model), "--out", "/", "--overwrite"], "is the root directory")
    before["home/quantize_report.json"] = b"{}"
    assert _tree(tmp_path) == before


def test_overwrite_replaces_an_empty_directory(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    quantize_model(stories_dir, "w4a16-rtn", out, overwrite=True, **SMALL)
    assert (out / "quantize_report.json").is_file()


def test_a_wrongly_typed_recipe_value_names_the_type(stories_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text('name: mine\nmethod: rtn\nweights: {bits: "4", strategy: channel, group_size: null}\n')
    _one_line_exit_2(["model", str(stories_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o")],
                     "recipe.weights.bits must be an integer, got '4' (str)")


def test_leftovers_of_killed_runs_are_removed(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    dead, live = _dead_pid(), os.getpid()
    leftovers = [tmp_path / f".o.tmp-{dead}-abc", tmp_path / ".o.tmp-xyz", tmp_path / f".o.old-{dead}-abc"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".o.tmp-{live}-abc"  # a run still in progress: not ours to remove
    running.mkdir()
    unrelated = tmp_path / ".other.tmp-1-abc"
    unrelated.mkdir()
    result = runner.invoke(app, ["model", str(stories_dir), "--out", str(out), "--recipe", "w4a16-rtn",
                                 "--samples", "2", "--calib-seqlen", "32"])
    assert result.exit_code == 0, result.output
    assert f"removed 3 leftover directories of an interrupted run beside {out}" in result.stderr
    assert not any(d.exists() for d in leftovers)
    assert running.is_dir() and unrelated.is_dir() and (out / "model.safetensors").is_file()


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "o[1]"  # glob characters in the name are taken literally
    aside = tmp_path / f".o[1].old-{_dead_pid()}-abc" / "x"
    aside.mkdir(parents=True)
    (aside / "quantize_report.json").write_text("{}")
    line = remove_leftovers(out)
    assert line is not None and "back in place" in line
    assert (out / "quantize_report.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["o[1]"]
    assert remove_leftovers(out) is None


def test_a_failing_writer_keeps_the_old_output(stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    quantize_model(stories_dir, "w4a16-rtn", out, **SMALL)
    before = _tree(out)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(output, "write_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize_model(stories_dir, "w8a8", out, overwrite=True, **SMALL)
    assert _tree(out) == before
    # Every block had finished: the staging directory stays, holding them for --resume, and nothing else
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[1:] == ["o"] and left[0].startswith(".o.tmp-")
    assert (tmp_path / left[0] / ".resume" / "state.json").is_file()
    (tmp_path / left[0]).rename(tmp_path / f".o.tmp-{_dead_pid()}-x")  # as if this process had been killed
    monkeypatch.undo()
    quantize_model(stories_dir, "w8a8", out, overwrite=True, resume=True, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or old directory left
    assert json.loads((out / "quantize_report.json").read_text())["recipe"]["name"] == "w8a8"


def test_a_failing_final_rename_puts_the_old_output_back(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "quantize_report.json").write_text(json.dumps({"old": True}))
    missing = tmp_path / ".o.tmp-1-gone"  # renaming a staging directory that vanished fails
    with pytest.raises(FileNotFoundError):
        move_into_place(missing, out, overwrite=True)
    assert json.loads((out / "quantize_report.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_check_destination_is_silent_for_a_new_directory(tmp_path: Path) -> None:
    check_destination(tmp_path / "a" / "b" / "c", overwrite=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LowbitError, match="already exists"):
        check_destination(tmp_path, overwrite=False)
