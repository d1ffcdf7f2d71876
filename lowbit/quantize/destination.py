"""Where a run may write: the checks on ``--out`` before any heavy work, and the atomic swap at the end.

A run writes into a staging directory beside ``--out`` (``.<name>.tmp-<pid>-<random>``) and renames it into
place only when complete. Replacing an existing ``--out`` (``--overwrite``) moves the old one aside first
(``.<name>.old-<pid>-<random>/x``) and deletes it only once the new one is in place, so a failure at any
point leaves the old output where it was. A run that was killed leaves its staging directory behind; the
next run to the same ``--out`` removes those of processes that are no longer running (and moves back an old
output that a killed run had moved aside but not yet replaced).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError

REPORT_FILE = "quantize_report.json"  # what marks a directory as a lowbit output


def _protected(target: Path) -> str | None:
    """Why ``target`` (resolved) may never be replaced, or None."""
    if target == Path(target.anchor):
        return "the root directory"
    if target == Path.home().resolve():
        return "the home directory"
    return None


def check_destination(out: Path, overwrite: bool, model_dir: Path | None = None) -> None:
    """Refuse, with one line, an ``out`` this run may not create or replace; writes nothing.

    ``out`` may be replaced (with ``overwrite``) only when it is an empty directory or a previous lowbit output
    (it holds quantize_report.json), and never when it is ``/``, the home directory, ``model_dir`` or a
    directory that contains ``model_dir``. Its parent must exist as a writable directory or be creatable.
    """
    target = out.expanduser().resolve()
    if out.exists() or out.is_symlink():
        why = _protected(target)
        if why is None and model_dir is not None:
            model = model_dir.expanduser().resolve()
            if target == model or target in model.parents:
                why = "the model directory" if target == model else f"a directory that contains the model directory {model}"
        if why is not None:
            raise LowbitError(f"--out {out} is {why}: refusing to write there")
        if not overwrite:
            raise LowbitError(f"output directory {out} already exists; pass --overwrite to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file()):
            raise LowbitError(f"--overwrite replaces only an empty directory or a previous lowbit output (one holding "
                              f"{REPORT_FILE}); {out} is neither")
    anchor = target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise LowbitError(f"cannot create --out {out}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write --out {out}: {anchor} is not writable")


def _staged(out: Path, kind: str) -> list[tuple[Path, int | None]]:
    """The ``kind`` ("tmp" or "old") directories beside ``out``, with the process id in their names (None for
    names without one)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-(?:(\d+)-)?[^/]*$")
    found = []
    for p in sorted(out.parent.glob(glob.escape(f".{out.name}.{kind}-") + "*")) if out.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m and p.is_dir():
            found.append((p, int(m.group(1)) if m.group(1) else None))
    return found


def _running(pid: int | None) -> bool:
    """Whether the process that named a staging directory still runs (a name without a pid: no)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def remove_leftovers(out: Path) -> str | None:
    """Clean up after killed runs to ``out``: remove their staging directories (and old outputs they had moved
    aside), or move such an old output back when ``out`` itself is missing. Returns one line saying what was
    done, or None when there was nothing to do."""
    out = out.expanduser().absolute()
    removed, restored = [], None
    for p, pid in _staged(out, "old"):
        if _running(pid):
            continue
        if not out.exists() and (p / "x").is_dir():
            (p / "x").rename(out)
            restored = p.name
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    for p, pid in _staged(out, "tmp"):
        if not _running(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if not removed:
        return None
    line = f"removed {len(removed)} leftover director{'y' if len(removed) == 1 else 'ies'} of an interrupted run beside {out}"
    return line + (f" (the previous output, moved aside in {restored}, is back in place)" if restored else "")


def leftover_staging(out: Path) -> list[Path]:
    """The staging directories beside ``out`` of processes that are no longer running (what ``--resume`` may take
    over), by name."""
    return [p for p, pid in _staged(out.expanduser().absolute(), "tmp") if not _running(pid)]


def claim_staging(staged: Path, out: Path) -> Path:
    """Rename a dead run's staging directory to one named after this process (so no other run removes it) and
    return the new path."""
    target = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=staged.parent))
    target.rmdir()
    staged.rename(target)
    return target


def staging_dir(out: Path) -> Path:
    """A new empty staging directory beside ``out`` (its parents created), named after this process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def move_into_place(staged: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete ``staged`` directory to ``out``, replacing it (``overwrite``) only once the new one is
    ready; if the final rename fails, the previous ``out`` is moved back."""
    if not (out.exists() or out.is_symlink()):
        staged.rename(out)
        return
    check_destination(out, overwrite)  # it may have appeared or changed since the run started
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    out.rename(old / "x")
    try:
        staged.rename(out)
    except BaseException:
        (old / "x").rename(out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
