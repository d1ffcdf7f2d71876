"""Where the default evaluation and calibration data come from.

Three kinds of data feed lowbit: the WikiText-2 test text (perplexity), calibration text (Hessians and
statistics), and zero-shot task rows (accuracy). Each has an explicit-path form and a default. Defaults are
resolved in this order:

1. ``$LOWBIT_DATA_DIR``, a folder laid out like the project's ``shared/data``::

       wikitext-2/test_rows.json     JSON list of WikiText-2 raw test rows
       calib/wikipedia.txt           raw calibration text
       zeroshot/<task>.jsonl         one task row per line (layouts in :func:`task_rows`)

2. The Hugging Face hub through ``datasets.load_dataset``. Machines without network access get a one-line
   :class:`LowbitError` that names the option to pass instead and the environment variable.

Everything returned is plain Python (str, list, dict): no tokenizer, no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

DATA_ENV = "LOWBIT_DATA_DIR"
TASKS: tuple[str, ...] = ("lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge")

# The fields and types every row of a task must have, checked on load so that a malformed file fails
# here with its line number instead of deep inside the scoring loop.
_ROW_FIELDS: dict[str, dict[str, type]] = {
    "lambada_openai": {"context": str, "continuation": str},
    "piqa": {"query": str, "choices": list, "gold": int},
    "arc_easy": {"query": str, "choices": list, "gold": int},
    "arc_challenge": {"query": str, "choices": list, "gold": int},
    "winogrande": {"context_options": list, "continuation": str, "gold": int},
}


def data_dir() -> Path | None:
    """The folder named by ``$LOWBIT_DATA_DIR``, or None when the variable is unset or empty."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise LowbitError(f"{DATA_ENV}={value} is not a folder")
    return folder


def _default_file(relative: str) -> Path | None:
    """``$LOWBIT_DATA_DIR/relative`` if the variable is set (the file must then exist), else None."""
    folder = data_dir()
    if folder is None:
        return None
    path = folder / relative
    if not path.is_file():
        raise LowbitError(f"{DATA_ENV}={folder} has no {relative}")
    return path


def _existing(path: str | Path, suffixes: tuple[str, ...], allow_dir: bool = False) -> Path:
    """Check that ``path`` exists and has one of ``suffixes`` (or is a folder when ``allow_dir``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LowbitError(f"no such file: {path}")
    if path.is_dir():
        if allow_dir:
            return path
        raise LowbitError(f"{path} is a folder; expected a {' or '.join(suffixes)} file")
    if path.suffix.lower() not in suffixes:
        raise LowbitError(f"{path}: expected a {' or '.join(suffixes)} file, got '{path.suffix or 'no extension'}'")
    return path


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text; decoding and OS errors become one-line LowbitErrors."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LowbitError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _read_json_strings(path: Path) -> list[str]:
    """A JSON file holding a list of strings."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LowbitError(f"{path} must hold a JSON list of strings")
    return value


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Objects of a JSON-lines file with their 1-based line numbers; blank lines are skipped."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path}:{number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise LowbitError(f"{path}:{number} must be a JSON object")
        rows.append((number, row))
    return rows


def _hub(name: str, option: str, load: Callable[[Any], Any]) -> Any:
    """Run ``load(datasets.load_dataset)``; any failure (usually no network) becomes one actionable line.

    ``option`` is the CLI flag that replaces this default, named in the message together with the
    environment variable, because the user cannot act on a urllib traceback.
    """
    hint = f"pass {option} or set {DATA_ENV} to a folder laid out like shared/data"
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"cannot load {name}: the 'datasets' package is not installed; {hint}") from None
    try:
        return load(datasets.load_dataset)
    except Exception as exc:  # noqa: BLE001 - offline, hub errors, cache errors: all need the same remedy
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"cannot download {name} (offline?): {hint} [{first[:160]}]") from None


def wikitext2_test_text(data: str | Path | None = None) -> str:
    """The WikiText-2 raw test text, exactly as the perplexity protocol tokenizes it.

    Args:
        data: a ``.json`` list of row strings (joined with ``"\\n\\n"``) or a ``.txt`` used as is.
            None: ``$LOWBIT_DATA_DIR/wikitext-2/test_rows.json`` if set, else ``wikitext-2-raw-v1`` test
            from the hub.
    """
    if data is None:
        data = _default_file("wikitext-2/test_rows.json")
    if data is None:
        rows = _hub(
            "wikitext-2-raw-v1",
            "--data FILE",
            lambda load: load("wikitext", "wikitext-2-raw-v1", split="test")["text"],
        )
        return "\n\n".join(rows)
    path = _existing(data, (".json", ".txt"))
    text = _read_text(path) if path.suffix.lower() == ".txt" else "\n\n".join(_read_json_strings(path))
    if not text.strip():
        raise LowbitError(f"{path} holds no text")
    return text


def calibration_texts(path: str | Path | None = None) -> list[str]:
    """Calibration documents, one string each.

    Args:
        path: a ``.txt`` (one document), a ``.json`` list of strings, a ``.jsonl`` with a ``"text"`` field
            per line, or a folder written by ``datasets.Dataset.save_to_disk`` (its ``"text"`` column).
            None: ``$LOWBIT_DATA_DIR/calib/wikipedia.txt`` if set, else WikiText-2 raw train from the hub,
            returned as ONE document with rows joined by ``"\\n\\n"`` (the same joining as the test text).

    Returns:
        Non-empty list of documents; empty strings are dropped because they carry no tokens.
    """
    if path is None:
        path = _default_file("calib/wikipedia.txt")
    if path is None:
        rows = _hub(
            "wikitext-2-raw-v1 (train)",
            "--calib FILE",
            lambda load: load("wikitext", "wikitext-2-raw-v1", split="train")["text"],
        )
        return ["\n\n".join(rows)]
    path = _existing(path, (".txt", ".json", ".jsonl"), allow_dir=True)
    if path.is_dir():
        texts = _load_saved_dataset(path)
    elif path.suffix.lower() == ".txt":
        texts = [_read_text(path)]
    elif path.suffix.lower() == ".json":
        texts = _read_json_strings(path)
    else:
        texts = []
        for number, row in _read_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise LowbitError(f"{path}:{number} has no string field 'text'")
            texts.append(row["text"])
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise LowbitError(f"{path} holds no calibration text")
    return texts


def _load_saved_dataset(path: Path) -> list[str]:
    """The ``"text"`` column of a folder written by ``save_to_disk`` (a DatasetDict uses its train split)."""
    try:
        import datasets

        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise LowbitError(f"{path} is not a folder written by datasets' save_to_disk: {type(exc).__name__}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise LowbitError(f"{path} holds splits {sorted(loaded)}; save one split or name it 'train'")
    if "text" not in loaded.column_names:
        raise LowbitError(f"{path} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    texts = loaded["text"]
    if not all(isinstance(text, str) for text in texts):
        raise LowbitError(f"{path}: the 'text' column must hold strings")
    return list(texts)


def task_rows(task: str, path: str | Path | None = None) -> list[dict]:
    """Rows of a zero-shot task, in the layout of ``shared/data/zeroshot/<task>.jsonl``.

    Layouts (text exactly as stored; the scorer adds lm-evaluation-harness's prompt pieces):

    - lambada_openai: ``{"context": str, "continuation": str}`` - the passage without its last word (no
      trailing space) and the last word (no leading space).
    - piqa: ``{"query": "Question: <goal>\\n", "choices": [sol1, sol2], "gold": int}``.
    - arc_easy, arc_challenge: ``{"query": "Question: <question>", "choices": [...], "gold": int}``.
    - winogrande: ``{"context_options": [sentence up to "_" + option, ...], "continuation": str, "gold": int}``
      - the continuation is the text after "_", stripped.

    Args:
        task: one of :data:`TASKS`.
        path: a ``.jsonl`` file in that layout. None: ``$LOWBIT_DATA_DIR/zeroshot/<task>.jsonl`` if set,
            else the task's Hugging Face dataset converted to the layout.
    """
    if task not in _ROW_FIELDS:
        raise LowbitError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    if path is None:
        path = _default_file(f"zeroshot/{task}.jsonl")
    if path is None:
        return _task_rows_from_hub(task)
    path = _existing(path, (".jsonl",))
    rows = []
    for number, row in _read_jsonl(path):
        _check_row(task, row, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise LowbitError(f"{path} holds no {task} rows")
    return rows


def _check_row(task: str, row: dict[str, Any], where: str) -> None:
    """Raise a LowbitError naming ``where`` if ``row`` lacks a field of ``task``'s layout."""
    for field, kind in _ROW_FIELDS[task].items():
        value = row.get(field)
        # bool is an int subclass; a gold of True would silently mean choice 1.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise LowbitError(f"{where}: {task} rows need a {kind.__name__} field '{field}'")
    options = row.get("choices", row.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(option, str) for option in options):
            raise LowbitError(f"{where}: {task} rows need a list of at least two option strings")
        if not 0 <= row["gold"] < len(options):
            raise LowbitError(f"{where}: gold {row['gold']} is not an index into {len(options)} options")


# Conversions from the hub datasets lm-evaluation-harness uses. They mirror its prompt templates so that
# the local files and these rows score identically; they cannot be exercised without network access.
def _lambada_rows(dataset: Any) -> list[dict]:
    rows = []
    for text in dataset["text"]:
        # lm-eval: context = all words but the last joined by " ", target = " " + last word.
        context, _, last = text.rpartition(" ")
        rows.append({"context": context, "continuation": last})
    return rows


def _piqa_rows(dataset: Any) -> list[dict]:
    return [
        {"query": f"Question: {doc['goal']}\n", "choices": [doc["sol1"], doc["sol2"]], "gold": int(doc["label"])}
        for doc in dataset
    ]


def _winogrande_rows(dataset: Any) -> list[dict]:
    rows = []
    for doc in dataset:
        blank = doc["sentence"].index("_")
        rows.append({
            "context_options": [doc["sentence"][:blank] + doc[key] for key in ("option1", "option2")],
            "continuation": doc["sentence"][blank + 1:].strip(),
            "gold": int(doc["answer"]) - 1,  # answers are the strings "1" / "2"
        })
    return rows


def _arc_rows(dataset: Any) -> list[dict]:
    return [
        {
            "query": f"Question: {doc['question']}",
            "choices": list(doc["choices"]["text"]),
            # answerKey is a letter or, in a few rows, a digit; it always matches one of the labels.
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"]),
        }
        for doc in dataset
    ]


# task -> (load_dataset positional arguments, split, converter). baber/piqa is the parquet copy that
# lm-eval reads (the original "piqa" repository is a loading script that datasets no longer runs).
_HUB_TASKS: dict[str, tuple[tuple[str, ...], str, Callable[[Any], list[dict]]]] = {
    "lambada_openai": (("EleutherAI/lambada_openai", "default"), "test", _lambada_rows),
    "piqa": (("baber/piqa",), "validation", _piqa_rows),
    "winogrande": (("allenai/winogrande", "winogrande_xl"), "validation", _winogrande_rows),
    "arc_easy": (("allenai/ai2_arc", "ARC-Easy"), "test", _arc_rows),
    "arc_challenge": (("allenai/ai2_arc", "ARC-Challenge"), "test", _arc_rows),
}


def _task_rows_from_hub(task: str) -> list[dict]:
    """Download ``task`` with ``datasets`` and convert it to the local jsonl layout."""
    args, split, convert = _HUB_TASKS[task]
    dataset = _hub(task, f"a {task}.jsonl path", lambda load: load(*args, split=split))
    try:
        rows = convert(dataset)
    except (KeyError, TypeError, ValueError) as exc:
        raise LowbitError(f"{task} from the hub has an unexpected layout ({type(exc).__name__}: {exc})") from None
    for number, row in enumerate(rows):
        _check_row(task, row, f"{task} hub row {number}")
    return rows
