"""Tests of lowbit.calibrate.sources: every accepted file layout, the LOWBIT_DATA_DIR defaults, the hub
conversions (with datasets.load_dataset faked, never the network) and the one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest

from lowbit.calibrate import sources
from lowbit.calibrate.sources import TASKS, calibration_texts, task_rows, wikitext2_test_text
from lowbit.errors import LowbitError


def _shared_data() -> Path:
    """The project's shared/data folder: $LOWBIT_DATA_DIR if set, else ../shared/data beside the repo."""
    env = os.environ.get("LOWBIT_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch, require: Callable[[object, str], None]) -> Path:
    folder = _shared_data()
    require((folder / "wikitext-2" / "test_rows.json").is_file(), f"the shared data at {folder}")
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LOWBIT_DATA_DIR and a load_dataset that fails the way it does without network."""
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def _one_line_error(call: object, *args: object) -> str:
    with pytest.raises(LowbitError) as info:
        call(*args)  # type: ignore[operator]
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- WikiText-2 -------------------------------------------------------------------------------------------

def test_wikitext_default_joins_rows_from_data_dir(data_dir: Path) -> None:
    rows = json.loads((data_dir / "wikitext-2" / "test_rows.json").read_text(encoding="utf-8"))
    text = wikitext2_test_text()
    assert len(rows) == 4358
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n")  # row 0 is empty, so the text opens with the joiner


def test_wikitext_json_and_txt(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps(["a", "", " b "]), encoding="utf-8")
    (tmp_path / "raw.txt").write_text("raw\n\ntext", encoding="utf-8")
    assert wikitext2_test_text(tmp_path / "rows.json") == "a\n\n\n\n b "
    assert wikitext2_test_text(str(tmp_path / "raw.txt")) == "raw\n\ntext"


@pytest.mark.parametrize(
    ("name", "content"),
    [("rows.csv", "a,b"), ("rows.json", "{not json"), ("rows.json", '{"a": 1}'), ("rows.json", "[1, 2]"),
     ("empty.txt", "  \n")],
)
def test_wikitext_bad_files(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    _one_line_error(wikitext2_test_text, tmp_path / name)


def test_wikitext_missing_and_undecodable(tmp_path: Path) -> None:
    assert "no such file" in _one_line_error(wikitext2_test_text, tmp_path / "nope.json")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x80")
    assert "cannot read" in _one_line_error(wikitext2_test_text, tmp_path / "bin.txt")


# --- calibration ------------------------------------------------------------------------------------------

def test_calibration_default_from_data_dir(data_dir: Path) -> None:
    texts = calibration_texts()
    assert texts == [(data_dir / "calib" / "wikipedia.txt").read_text(encoding="utf-8")]


def test_calibration_round_trips_every_layout(tmp_path: Path) -> None:
    docs = ["first document\nwith two lines", "second one", "third: ünïcode"]
    (tmp_path / "one.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "docs.json").write_text(json.dumps(docs), encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n", encoding="utf-8"
    )
    datasets.Dataset.from_dict({"text": docs, "id": [0, 1, 2]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "dd"))

    assert calibration_texts(tmp_path / "one.txt") == [docs[0]]
    assert calibration_texts(tmp_path / "docs.json") == docs
    assert calibration_texts(str(tmp_path / "docs.jsonl")) == docs
    assert calibration_texts(tmp_path / "saved") == docs
    assert calibration_texts(tmp_path / "dd") == docs


def test_calibration_drops_empty_documents(tmp_path: Path) -> None:
    (tmp_path / "docs.json").write_text(json.dumps(["", "kept", "   "]), encoding="utf-8")
    assert calibration_texts(tmp_path / "docs.json") == ["kept"]


def test_calibration_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "no_text.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    assert ":2 " in _one_line_error(calibration_texts, tmp_path / "no_text.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    assert ":2 " in _one_line_error(calibration_texts, tmp_path / "broken.jsonl")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    _one_line_error(calibration_texts, tmp_path / "empty.json")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    assert ".parquet" in _one_line_error(calibration_texts, tmp_path / "data.parquet")
    (tmp_path / "plain_dir").mkdir()
    assert "save_to_disk" in _one_line_error(calibration_texts, tmp_path / "plain_dir")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "no_col"))
    assert "'text' column" in _one_line_error(calibration_texts, tmp_path / "no_col")
    _one_line_error(calibration_texts, tmp_path / "missing.txt")


# --- zero-shot tasks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_task_rows_from_data_dir(data_dir: Path, task: str) -> None:
    rows = task_rows(task)
    lines = (data_dir / "zeroshot" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len([line for line in lines if line.strip()])
    assert rows[0] == json.loads(lines[0])


def test_task_rows_unknown_task_lists_valid_ones() -> None:
    message = _one_line_error(task_rows, "hellaswag")
    assert all(task in message for task in TASKS)


@pytest.mark.parametrize(
    "row",
    [{"query": "Q", "choices": ["a", "b"], "gold": 2}, {"query": "Q", "choices": ["a", "b"]},
     {"query": "Q", "choices": ["a"], "gold": 0}, {"query": "Q", "choices": ["a", "b"], "gold": True},
     {"query": 3, "choices": ["a", "b"], "gold": 0}],
)
def test_task_rows_malformed(tmp_path: Path, row: dict) -> None:
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"query": "ok", "choices": ["a", "b"], "gold": 0}) + "\n" + json.dumps(row) + "\n")
    assert "arc.jsonl:2" in _one_line_error(task_rows, "arc_easy", path)


def test_task_rows_wrong_extension(tmp_path: Path) -> None:
    (tmp_path / "piqa.json").write_text("[]", encoding="utf-8")
    _one_line_error(task_rows, "piqa", tmp_path / "piqa.json")


def test_data_dir_env_must_be_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "absent"))
    assert "LOWBIT_DATA_DIR" in _one_line_error(wikitext2_test_text)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))  # a folder, but without the expected files
    assert "wikitext-2/test_rows.json" in _one_line_error(wikitext2_test_text)
    assert "zeroshot/piqa.jsonl" in _one_line_error(task_rows, "piqa")


# --- hub defaults (network faked) -------------------------------------------------------------------------

def test_offline_defaults_name_the_remedy(offline: None) -> None:
    message = _one_line_error(wikitext2_test_text)
    assert "LOWBIT_DATA_DIR" in message and "--data" in message and "offline" in message
    message = _one_line_error(calibration_texts)
    assert "LOWBIT_DATA_DIR" in message and "--calib" in message
    for task in TASKS:
        assert "LOWBIT_DATA_DIR" in _one_line_error(task_rows, task)


def test_hub_defaults_convert_to_the_local_layout(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """Feed the converters hub-shaped rows rebuilt from the local files; they must give the local rows back."""
    local = {task: task_rows(task)[0] for task in TASKS}
    arc = local["arc_easy"]
    wino = local["winogrande"]
    blank = wino["context_options"][0].rsplit(" ", 1)[0] + " _ " + wino["continuation"]
    hub = {
        ("wikitext", "test"): {"text": ["a", "", "b"]},
        ("wikitext", "train"): {"text": ["c", "d"]},
        ("EleutherAI/lambada_openai", "test"): {
            "text": [local["lambada_openai"]["context"] + " " + local["lambada_openai"]["continuation"]]},
        ("baber/piqa", "validation"): {
            "goal": [local["piqa"]["query"][len("Question: "):-1]], "sol1": [local["piqa"]["choices"][0]],
            "sol2": [local["piqa"]["choices"][1]], "label": [local["piqa"]["gold"]]},
        ("allenai/winogrande", "validation"): {
            "sentence": [blank], "option1": [wino["context_options"][0].rsplit(" ", 1)[1]],
            "option2": [wino["context_options"][1].rsplit(" ", 1)[1]], "answer": [str(wino["gold"] + 1)]},
        ("allenai/ai2_arc", "test"): {
            "question": [arc["query"][len("Question: "):]],
            "choices": [{"text": arc["choices"], "label": list("ABCD")}], "answerKey": ["ABCD"[arc["gold"]]]},
    }
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, *args, split: datasets.Dataset.from_dict(hub[(path, split)]))
    assert wikitext2_test_text() == "a\n\n\n\nb"
    assert calibration_texts() == ["c\n\nd"]
    for task in ("lambada_openai", "piqa", "winogrande", "arc_easy"):
        assert task_rows(task) == [local[task]], task
    assert sources._HUB_TASKS["arc_challenge"][0] == ("allenai/ai2_arc", "ARC-Challenge")
