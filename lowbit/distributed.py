"""Several processes with torch.distributed: each rank runs a share of the calibration batches through every block,
the statistics are all-reduced before rounding, the rounding of a block's linears is split across ranks, and rank 0
writes the output.

A run is distributed when ``torchrun`` (or ``quantize model --nproc N``, which starts torchrun) sets ``WORLD_SIZE``
> 1: gloo on the CPU, NCCL with ``--device cuda`` (rank r on GPU ``LOCAL_RANK``). What keeps the output equal to a
one-process run's:

- the calibration batches are the same ``--batch-size`` slices of the same windows, rank r taking a contiguous run
  of them, so every batch's forward pass computes the same numbers (CPU GEMMs give the same bits on 1 or 2
  threads; ``--nproc`` gives each process ``cpu_count // N`` threads, plain torchrun 1 unless ``OMP_NUM_THREADS``
  is set);
- Hessians are summed in float64 from each batch's float32 ``X^T X`` (calibrate/stats.py), so the order of the sum
  (one rank's batches, then the all-reduce) changes it only where the terms span more than ~2^25 in magnitude, and
  then by under one float32 rounding after the cast;
- rounding splits the rows of a (concatenated) weight among the ranks (quantize/rounding.py): given the Hessian,
  each row's codes, scales and loss depend on that row alone; GPTQ factors the Hessian on one thread (LAPACK's
  result depends on the thread count). What may still differ is a row's arithmetic in the GEMMs of GPTQ's lazy
  updates, which run over fewer rows per process; on stories260K the two outputs are the same bytes
  (tests/quantize/test_scale.py) and BENCHMARKS.md counts the codes that differ on SmolLM2.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from lowbit.errors import LowbitError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for the others in a collective


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world > 1


def world_size() -> int:
    """The number of processes torchrun started for this run (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> Ranks:
    """Join the process group that torchrun described in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); a single process when ``WORLD_SIZE`` is unset or 1.

    Raises:
        LowbitError: one line when the group cannot be formed (a port that is taken, a rank that never came).
    """
    world = world_size()
    if world <= 1:
        return Ranks(0, 1, device)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise LowbitError(f"rank {rank}: --device cuda needs one GPU per process, but torch sees {torch.cuda.device_count()}")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise LowbitError(f"rank {rank}: cannot join the process group: {one_line(exc)}") from None
    return Ranks(rank, world, device)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def batch_share(n_windows: int, batch_size: int, ranks: Ranks) -> slice:
    """The windows of rank ``r``: a contiguous run of whole batches (batch ``k`` is windows ``[k*b, (k+1)*b)``)."""
    n_batches = -(-n_windows // batch_size)
    if n_batches < ranks.world:
        raise LowbitError(f"{n_batches} calibration batches cannot be shared by {ranks.world} processes: "
                          "raise --samples or lower --batch-size")
    first = n_batches * ranks.rank // ranks.world
    last = n_batches * (ranks.rank + 1) // ranks.world
    return slice(first * batch_size, min(last * batch_size, n_windows))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or maxed) over the ranks, in place; unchanged in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise LowbitError(f"{OTHER_FAILED}: {one_line(exc)}") from None
    return t


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` (a picklable object between the run's own processes), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    found: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(found, value)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise LowbitError(f"{OTHER_FAILED}: {one_line(exc)}") from None
    return found


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    return all_gather(value)[0]


def barrier() -> None:
    all_gather(None)


def split_rows(n_rows: int, fn: Callable[[int, int], T]) -> list[T]:
    """``fn(start, stop)`` on this rank's contiguous share of ``n_rows`` rows; every rank's results, in row order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [fn(0, n_rows)]
    world, rank = dist.get_world_size(), dist.get_rank()
    start, stop = n_rows * rank // world, n_rows * (rank + 1) // world
    mine = fn(start, stop) if stop > start else None
    device = _device_of(mine)
    # through the CPU: an unpickled CUDA tensor would land on the GPU of the rank that sent it
    return [moved(part, device) for part in all_gather(moved(mine, "cpu"))]


def moved(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor inside (dataclasses, tuples, lists, dicts) on ``device`` (None: unchanged)."""
    if device is None or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(moved(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    return obj


def _device_of(obj: Any) -> torch.device | None:
    """The device of the first tensor inside ``obj`` (see :func:`moved`), or None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    values: list[Any] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (tuple, list)):
        values = list(obj)
    elif isinstance(obj, dict):
        values = list(obj.values())
    for v in values:
        d = _device_of(v)
        if d is not None:
            return d
    return None


def shutdown() -> None:
    """Leave the process group (end of the run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


OTHER_FAILED = "another process of the run failed"
_ERROR_LINE = re.compile(r"(?:^|\r|\])(error: [^\r\n]*)")
_TORCHRUN_LOG = re.compile(r"^(?:[WEI]\d{4} \d\d:\d\d:|\[[WEI] |Traceback \(most recent call last\))")


def check_port(port: int) -> None:
    """One line if ``port`` cannot be bound on localhost (taken, or out of range); torchrun would wait for a peer there."""
    if not 0 < port < 65536:
        raise LowbitError(f"--port {port} is not a port number (1-65535)")
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise LowbitError(f"--port {port} is taken ({exc.strerror}): pick another, or leave --port out for a free one") from None


def launch(nproc: int, port: int | None, argv: list[str]) -> int:
    """``quantize <argv>`` in ``nproc`` processes started by torchrun (torch.distributed.run); returns the exit code.

    The processes' output (rank 0's progress bars, each distinct ``error:`` line once) is passed through; torchrun's
    own log lines and its failure report are not, and when a process died without a word one line says so.
    """
    if port is not None:
        check_port(port)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += ["--standalone"] if port is None else ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    cmd += ["-m", "lowbit.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    errors: list[str] = []
    quiet, pending, taken, mid_line = False, b"", False, False

    def show(text: str) -> None:
        nonlocal mid_line
        sys.stderr.write(text)
        mid_line = not text.endswith("\n")

    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            pending += chunk
            while (cut := pending.find(b"\n")) >= 0:
                line, pending = pending[: cut + 1], pending[cut + 1 :]
                text = line.decode(errors="replace")
                taken = taken or "address already in use" in text.lower()
                if _TORCHRUN_LOG.match(text.lstrip("\r")):
                    quiet = True
                error = _ERROR_LINE.search(text)
                if error is not None:  # a process's one-line error, maybe after a progress bar's last update
                    if error.group(1) not in errors:
                        errors.append(error.group(1))
                    text = text[: error.start(1)]
                if text.strip() and not quiet:
                    show(text)
            if pending.startswith(b"\r") and not quiet:  # a progress bar's update: show it now
                show(pending.decode(errors="replace"))
                pending = b""
            sys.stderr.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        sys.stderr.write("\ninterrupted\n")
        return 130
    if mid_line:
        sys.stderr.write("\n")
    # One line: the process that failed first says why; the others only saw it go ("another process ... failed").
    own = [e for e in errors if OTHER_FAILED not in e]
    if own or errors:
        sys.stderr.write((own or errors)[0] + "\n")
    elif code != 0:
        if taken:
            sys.stderr.write(f"error: port {port} is taken: pick another --port, or leave it out for a free one\n")
        else:
            sys.stderr.write(f"error: a process of the run died (torchrun exit code {code}); nothing was written\n")
    return code
