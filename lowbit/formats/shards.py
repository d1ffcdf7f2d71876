"""Writing a checkpoint's tensors as safetensors shards, one tensor in memory at a time.

The layout is transformers': one ``model.safetensors`` when everything fits in ``max_shard_size``, else
``model-0000N-of-0000M.safetensors`` and ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes of
tensor data}, "weight_map": {tensor: file}}``); a shard is closed when the next tensor would take it past the limit
(a tensor larger than the limit gets a shard of its own), as transformers closes them.

A safetensors file is an 8-byte little-endian header length, the JSON header (``name -> {dtype, shape,
data_offsets}`` relative to the data, ``__metadata__``), padded with spaces so the data starts at a multiple of 8,
then the tensors' bytes with no holes. Tensors arrive one by one (:class:`ShardWriter.add`); each is appended at once
to a spool file of its element size, and the shard is assembled when it closes, the spools copied in decreasing
element size so every tensor starts at a multiple of its own element size. The files are a pure function of the
tensors and their order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import torch

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import INDEX_FILE, WEIGHTS_FILE

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1000`` (transformers' units: GB = 10^9, GiB = 2^30); > 0."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        unit = next((u for u in _UNITS if s.endswith(u)), "")
        number = s[: len(s) - len(unit)]
        try:
            value = int(float(number) * _UNITS.get(unit, 1))
        except (ValueError, OverflowError):
            raise LowbitError(f"--max-shard-size {text!r} is not a size: write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise LowbitError(f"--max-shard-size must be positive, got {text!r}")
    return value


class _Shard:
    """One shard being filled: header entries and a spool file per element size."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory, self.index = directory, index
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, element size, nbytes
        self.spools: dict[int, BinaryIO] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in SAFETENSORS_DTYPES:
            raise LowbitError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        size = t.element_size()
        if size not in self.spools:
            self.spools[size] = open(self.directory / f".shard{self.index}.spool{size}", "w+b")
        n = t.numel() * size
        if n:
            self.spools[size].write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries.append((name, SAFETENSORS_DTYPES[t.dtype], list(t.shape), size, n))
        self.nbytes += n

    def close(self, path: Path) -> None:
        """Write the shard to ``path`` (header, then the spools largest element size first) and delete the spools."""
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for size in sorted(self.spools, reverse=True):
            for name, dtype, shape, s, n in self.entries:
                if s == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                    offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for size in sorted(self.spools, reverse=True):
                spool = self.spools[size]
                spool.seek(0)
                shutil.copyfileobj(spool, f, 16 << 20)
        for size, spool in self.spools.items():
            spool.close()
            os.unlink(self.directory / f".shard{self.index}.spool{size}")


class ShardWriter:
    """Writes tensors into ``directory`` as transformers-style safetensors shards (see the module docstring).

    ``add`` tensors in the order they should appear; ``close`` names the files and writes the index, and returns the
    weight files' names. Nothing is left but those files (and the index) once ``close`` returns.
    """

    def __init__(self, directory: Path, max_shard_size: int) -> None:
        self.directory, self.max_shard_size = directory, max_shard_size
        self._done: list[tuple[Path, list[str], int]] = []  # closed shards: temporary path, names, data bytes
        self._shard = _Shard(directory, 1)
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise LowbitError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard.entries and self._shard.nbytes + nbytes > self.max_shard_size:
            self._close_shard()
        self._shard.add(name, tensor)

    def _close_shard(self) -> None:
        path = self.directory / f".shard{self._shard.index}.safetensors"
        self._shard.close(path)
        self._done.append((path, [e[0] for e in self._shard.entries], self._shard.nbytes))
        self._shard = _Shard(self.directory, self._shard.index + 1)

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names, write the index if there are several."""
        if self._shard.entries or not self._done:
            self._close_shard()
        n = len(self._done)
        if n == 1:
            self._done[0][0].rename(self.directory / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        files, weight_map, total = [], {}, 0
        for k, (path, names, nbytes) in enumerate(self._done, start=1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            files.append(name)
            weight_map.update({t: name for t in names})
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to one safetensors file at ``path`` (atomically: a temporary name, then a rename), without
    first copying them all into one buffer as ``safetensors.torch.save_file`` does."""
    shard = _Shard(path.parent, os.getpid())
    try:
        for name, t in tensors.items():
            shard.add(name, t)
        tmp = path.with_name(path.name + ".tmp")
        shard.close(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before a state file names it (quantize/resume.py)
        tmp.rename(path)
    finally:
        for spool in shard.spools.values():
            spool.close()
