"""What a run keeps in its staging directory after each block, so that ``--resume`` continues a killed run.

The staging directory (quantize/destination.py) holds, under ``.resume/``:

- ``head.safetensors``: the tensors outside the decoder blocks, transformed, written before the block loop (the
  embedding and lm_head are not kept in memory while the blocks run);
- ``block-0000i.safetensors``: block ``i``'s finished tensors (its quantized linears and norms, full names), which
  are also what the final shards are assembled from;
- ``inputs-0000i-rank<r>.safetensors``: the calibration inputs of block ``i`` on rank ``r`` (``hidden.<k>`` per
  batch ``[b, L, D]``; ``float.<k>``, the float model's stream, for a block-trained transform) and the torch RNG
  state (``rng``), written after block ``i - 1``;
- ``state.json``: the run's fingerprint, ``done`` (blocks finished) and the per-layer results and block reports so
  far. It is written last, by a rename, after every rank's inputs: the commit point of a block.

``--resume`` looks for a leftover staging directory of a dead process beside ``--out`` whose fingerprint equals this
run's (same lowbit and torch, model files, recipe, calibration, seed, sizes, device, number of processes), takes
it over and continues from block ``done``: every block before it is read back instead of computed, and the output
is byte-identical to an uninterrupted run's (tests/quantize/test_scale.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import weight_files
from lowbit.formats.shards import write_file
from lowbit.quantize.destination import claim_staging, leftover_staging, remove_leftovers, staging_dir
from lowbit.quantize.results import LayerResult

STATE_DIR = ".resume"
STATE_FILE = "state.json"


def fingerprint(model_dir: Path, texts: list[str], settings: dict[str, Any]) -> str:
    """A digest of everything the output depends on: lowbit and torch versions, the model's config and weight files
    (names, sizes, modification times), the calibration texts and the run's ``settings`` (recipe, sizes, seed...)."""
    h = hashlib.sha256()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(model_dir)]
    head = {"lowbit": lowbit.__version__, "torch": torch.__version__, "model": str(model_dir), "files": files,
            "config": (model_dir / "config.json").read_text(encoding="utf-8"), "settings": settings}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


class RunState:
    """The resumable state of one run in its staging directory (see the module docstring).

    Attributes:
        staging: the staging directory; ``done``: blocks finished; ``record``: the saved results
        (``layers``: LayerResult dicts, ``block_reports``) of those blocks.
    """

    def __init__(self, staging: Path, key: str, done: int = 0, record: dict[str, Any] | None = None) -> None:
        self.staging, self.key, self.done = staging, key, done
        self.record: dict[str, Any] = record or {"layers": [], "block_reports": []}
        (staging / STATE_DIR).mkdir(exist_ok=True)

    @property
    def directory(self) -> Path:
        return self.staging / STATE_DIR

    @classmethod
    def begin(cls, out: Path, key: str, resume: bool, progress: bool) -> "RunState":
        """A fresh staging directory beside ``out`` (leftovers of killed runs removed), or with ``resume`` the leftover
        whose fingerprint is ``key``, taken over by this process.

        Raises:
            LowbitError: ``resume`` and the leftovers are of a run with other inputs (they are kept).
        """
        if resume:
            others = []
            for path in leftover_staging(out):
                state = _read_state(path)
                if state is None:
                    continue
                if state.get("fingerprint") != key:
                    others.append(path.name)
                    continue
                staging = claim_staging(path, out)
                if progress:
                    tqdm.write(f"resuming {path.name}: {state['done']} blocks done", file=sys.stderr)
                return cls(staging, key, int(state["done"]), {k: state[k] for k in ("layers", "block_reports")})
            if others:
                raise LowbitError(f"--resume: the interrupted run beside {out} ({', '.join(others)}) had other inputs "
                                  "(model, recipe, calibration, sizes, seed or number of processes); rerun it with those, "
                                  "or drop --resume to start over")
            if progress:
                tqdm.write(f"--resume: no interrupted run of this job beside {out}: starting from the first block", file=sys.stderr)
        cleaned = remove_leftovers(out)
        if cleaned and progress:
            tqdm.write(cleaned + " (pass --resume to continue one instead)", file=sys.stderr)
        return cls(staging_dir(out), key)

    @property
    def head_file(self) -> Path:
        """The tensors outside the decoder blocks (embedding, final norm, lm_head), as transformed."""
        return self.directory / "head.safetensors"

    def save_head(self, tensors: dict[str, torch.Tensor], rank: int) -> None:
        """The model's tensors outside its blocks, kept on disk until the output is assembled (rank 0 writes)."""
        if rank == 0:
            write_file(self.head_file, tensors)

    def block_file(self, i: int) -> Path:
        return self.directory / f"block-{i:05d}.safetensors"

    def _inputs_file(self, i: int, rank: int) -> Path:
        return self.directory / f"inputs-{i:05d}-rank{rank}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], rank: int) -> None:
        """Block ``i``'s finished tensors (rank 0 writes them)."""
        if rank == 0:
            write_file(self.block_file(i), tensors)

    def save_inputs(self, i: int, rank: int, hidden: list[torch.Tensor], stream: list[torch.Tensor] | None) -> None:
        """This rank's inputs of block ``i`` (and the float stream, if any) and the torch RNG state."""
        tensors = {f"hidden.{k}": h for k, h in enumerate(hidden)}
        tensors.update({f"float.{k}": h for k, h in enumerate(stream or [])})
        tensors["rng"] = torch.get_rng_state()
        write_file(self._inputs_file(i, rank), tensors)

    def commit(self, done: int, layers: list[LayerResult], block_reports: list[Any], rank: int) -> None:
        """Record ``done`` blocks as finished (rank 0, after every rank saved its inputs of block ``done``); drop the
        inputs that are no longer needed."""
        self.done = done
        if rank != 0:
            return
        state = {"fingerprint": self.key, "done": done, "layers": [asdict(r) for r in layers], "block_reports": block_reports}
        tmp = self.directory / (STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(state, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())  # the block files it names were synced before (formats/shards.write_file)
        tmp.rename(self.directory / STATE_FILE)
        for f in self.directory.glob("inputs-*.safetensors"):
            if int(f.name.split("-")[1]) < done:
                f.unlink(missing_ok=True)

    def load_inputs(self, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """This rank's saved inputs of block ``done`` (and float stream, or None); restores the torch RNG state."""
        path = self._inputs_file(self.done, rank)
        if not path.is_file():
            raise LowbitError(f"--resume: {path} is missing: the interrupted run's state is incomplete; drop --resume")
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            hidden = [f.get_tensor(f"hidden.{k}") for k in range(sum(k.startswith("hidden.") for k in keys))]
            n_float = sum(k.startswith("float.") for k in keys)
            stream = [f.get_tensor(f"float.{k}") for k in range(n_float)] if n_float else None
            torch.set_rng_state(f.get_tensor("rng"))
        return hidden, stream

    def layers(self) -> list[LayerResult]:
        """The saved per-layer results of the finished blocks."""
        return [LayerResult(**{**d, "shape": tuple(d["shape"])}) for d in self.record["layers"]]

    def resumable(self) -> bool:
        """Whether ``--resume`` can take this staging directory over (its state file is there)."""
        return (self.directory / STATE_FILE).is_file()

    def discard(self) -> None:
        """Delete the state once the output is complete (the block files have been copied into the shards)."""
        for f in self.directory.iterdir():
            f.unlink()
        self.directory.rmdir()


def _read_state(staging: Path) -> dict[str, Any] | None:
    path = staging / STATE_DIR / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "done" in state else None

