"""The one place that decides which GEMM implementation a QuantLinear runs (DESIGN.md principle 6)."""

from __future__ import annotations

from enum import Enum

from lowbit.errors import LowbitError


class Backend(str, Enum):
    """Kernel choice: "auto" picks the fastest available path, "triton" insists on Triton, "torch" is the reference."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


def resolve_backend(backend: Backend | str, device: str) -> Backend:
    """Resolve ``backend`` for tensors on ``device`` to a concrete Backend.

    No Triton kernel is registered yet (they land with the FP-formats/kernels issue), so "auto" always
    resolves to the torch reference path and an explicit "triton" is an error rather than a silent fallback.
    """
    try:
        b = Backend(backend)
    except ValueError:
        raise LowbitError(f"unknown kernel backend {backend!r}; valid: {', '.join(x.value for x in Backend)}") from None
    if b is Backend.TRITON:
        raise LowbitError("no Triton kernel is available in this version; use backend 'auto' or 'torch'")
    return Backend.TORCH
