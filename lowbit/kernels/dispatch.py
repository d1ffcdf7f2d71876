"""The one place that decides which GEMM implementation a QuantLinear runs (DESIGN.md principle 6)."""

from __future__ import annotations

import importlib.util
import os
from enum import Enum

from lowbit.errors import LowbitError


class Backend(str, Enum):
    """Kernel choice: "auto" picks the fastest available path, "triton" insists on Triton, "torch" is the reference."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


def triton_available(device: str) -> bool:
    """Triton can run on ``device``: CUDA with Triton installed, or any device under ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: Backend | str, device: str) -> Backend:
    """Resolve ``backend`` for tensors on ``device`` (a device type: "cpu", "cuda") to TRITON or TORCH.

    "auto" is Triton on CUDA (when Triton is installed) and the torch reference elsewhere, also under the
    interpreter, which is far too slow to be a default. "triton" where Triton cannot run is an error, not a
    silent fallback. A layer whose format/activation pair has no kernel takes the torch path either way.
    """
    try:
        b = Backend(backend)
    except ValueError:
        raise LowbitError(f"unknown kernel backend {backend!r}; valid: {', '.join(x.value for x in Backend)}") from None
    if b is Backend.TRITON and not triton_available(device):
        raise LowbitError(f"the Triton backend needs a CUDA device (or TRITON_INTERPRET=1), got {device!r}; use 'auto' or 'torch'")
    if b is Backend.AUTO:
        return Backend.TRITON if device == "cuda" and triton_available(device) else Backend.TORCH
    return b
