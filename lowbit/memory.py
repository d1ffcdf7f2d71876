"""The C heap: glibc's thresholds for a run's large, short-lived tensors, and giving freed pages back to the OS.

Torch's CPU tensors come from malloc. The calibration activations (a few MB to a few hundred MB, allocated and freed
batch by batch) fragment glibc's heap; freed chunks in the middle of the heap stay resident and count in the peak
memory. :func:`release_free_heap` (``malloc_trim(0)``, which also returns free pages inside the heap) is called at
the points where a large amount was just freed. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_heap_fragmentation() -> None:
    """Have glibc serve every allocation of 16 MiB or more with its own mmap, returned to the OS on free.

    The calibration pass allocates and frees tensors of 1-400 MB in changing sizes; with glibc's default
    dynamic threshold those end up in the heap after the first frees, which fragments: SmolLM2 w4a16 peaks
    over the float model + 2 GiB. A low fixed threshold (1 MiB) keeps the peak down but makes every temporary
    of the forward pass a fresh mmap whose pages the kernel faults in and zeroes, at a large cost in system
    time. At 16 MiB the batch activations ([8, 512, 576] float32, 9.4 MB) reuse heap memory and the 25 MB MLP
    tensors and larger still get their own mmap: under the memory target, and nearly as fast as glibc's
    default (BENCHMARKS.md, 2026-11-28, the allocator table, code of cb06c95). A no-op where the C library is
    not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD: give freed heap tops back beyond 16 MiB


def release_free_heap() -> None:
    """Give the pages of glibc's free heap chunks back to the OS (``malloc_trim(0)``); a no-op elsewhere.

    Called after BAQ's sensitivity pass: its 400 MB of Hessians (allocations under the 16 MiB mmap
    threshold) and the autograd buffers are freed between live blocks of the heap, which glibc keeps
    resident: without the trim the rounding pass starts with them still counted (BENCHMARKS.md, 2026-11-29,
    code of 70ca3af).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
