"""Small C kernels for the CPU, compiled once with the system C compiler and loaded with ctypes.

Some loops are too fine-grained for torch on the CPU: GPTQ's column loop issues ~10 small ops a column,
and their dispatch, not their arithmetic, sets its speed. Such a loop is written in plain C (no Python
or torch headers, so it compiles in well under a second) under ``lowbit/native/csrc/``, built on first
use into a per-user cache and loaded with ctypes, which releases the GIL during the call. Every kernel
here has a torch implementation it must equal bit for bit, which is also the fallback: when no C
compiler is found, or ``LOWBIT_NATIVE=0``, :func:`load` returns None and the caller runs torch.

The build is keyed by the source, the flags, the compiler and the CPU's feature flags (the code is
compiled for the CPU it runs on), written to a temporary file and moved into place, so concurrent first
uses and a shared home directory on machines with other CPUs are safe.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

SOURCES = Path(__file__).parent / "csrc"
# No fused multiply-add, no reassociation: the C loops must reproduce torch's float32 arithmetic exactly.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]


def cache_dir() -> Path:
    """Where built kernels live: ``native/`` in the lowbit cache, ``$LOWBIT_CACHE_DIR`` (default
    ``~/.cache/lowbit``; the root models/smollm2.py keeps the default model in, above this layer)."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit") / "native"


def _compiler() -> tuple[str, ...] | None:
    """The C compiler command: ``$CC`` if set (it may carry arguments, e.g. "ccache gcc"), else the first of
    cc, gcc, clang on PATH; None when there is none."""
    return _find_compiler(os.environ.get("CC"))


@functools.lru_cache(maxsize=None)
def _find_compiler(cc: str | None) -> tuple[str, ...] | None:
    """:func:`_compiler` for one value of ``$CC``, looked up once (kernels are looked up on every call)."""
    if cc:
        args = shlex.split(cc)
        path = shutil.which(args[0]) if args else None
        return None if path is None else (path, *args[1:])
    return next(((p,) for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_flags() -> str:
    """The CPU's feature list (Linux), so a build for one CPU is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def enabled() -> bool:
    """False when native kernels are switched off with ``LOWBIT_NATIVE=0`` (torch runs everything)."""
    return os.environ.get("LOWBIT_NATIVE", "1") != "0"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``csrc/{name}.c``, building it on first use; None when it cannot be built
    (no compiler, a compile error) or native kernels are switched off with ``LOWBIT_NATIVE=0``."""
    if not enabled():
        return None
    cc = _compiler()
    return None if cc is None else _build(name, cc)


BUILD_ERRORS: dict[str, str] = {}  # name -> why its last build failed (the compiler's message), for debugging


@functools.lru_cache(maxsize=None)
def _build(name: str, cc: tuple[str, ...]) -> ctypes.CDLL | None:
    """:func:`load` with compiler command ``cc``: once per process (a failure too: a process that could not
    build a kernel does not retry), and once per machine thanks to the cache."""
    source = (SOURCES / f"{name}.c").read_text()
    key = hashlib.sha256("\0".join([source, " ".join(FLAGS), " ".join(cc), platform.machine(), _cpu_flags()]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                lib = Path(tmp) / f"{name}.so"
                subprocess.run([*cc, *FLAGS, str(SOURCES / f"{name}.c"), "-o", str(lib)],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(lib, target)
        except subprocess.CalledProcessError as exc:
            BUILD_ERRORS[name] = exc.stderr
            return None
        except (OSError, subprocess.SubprocessError) as exc:
            BUILD_ERRORS[name] = str(exc)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        BUILD_ERRORS[name] = str(exc)
        return None


ALIGN = 16  # row slices start at multiples of 16 rows: on 64-byte lines when the row count is a multiple of 16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def over_row_slices(run: Callable[[int, int], None], rows: int, threads: int, min_rows: int) -> None:
    """Call ``run(r0, r1)`` on ``threads`` slices of ``rows`` at once (fewer when a slice would have under
    ``min_rows`` rows), for C kernels whose rows are independent: ctypes releases the GIL during each call."""
    n = max(1, min(threads, os.cpu_count() or 1, rows // max(min_rows, 1)))
    if n == 1:
        run(0, rows)
        return
    global _pool
    with _pool_lock:  # one pool for the process, as many threads as cores
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="lowbit-native")
    bounds = [min(rows, rows * k // n // ALIGN * ALIGN) for k in range(n)] + [rows]
    for f in [_pool.submit(run, a, b) for a, b in zip(bounds, bounds[1:])]:
        f.result()
