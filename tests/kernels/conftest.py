"""Fixtures shared by the kernel tests.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The interpreter is chosen
when triton is first imported, so ``TRITON_INTERPRET`` is set here, before any test module imports a kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16() -> None:
    """Make the Triton 3.6 interpreter treat bfloat16 as compiled Triton does (GPU code is unaffected).

    The interpreter stores bfloat16 as raw uint16 bit patterns, and (1) its ``tl.dot`` hands those patterns
    straight to ``np.matmul``, so every bf16 GEMM returns garbage; (2) its casts to bfloat16 truncate
    instead of rounding to nearest even, a systematic bias of up to one bf16 ulp. Here the dot widens bf16
    tiles to float32 first (exact) and the casts round through torch, as the GPU's bf16 MMA and cvt.rn do.
    """
    import numpy as np

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_lowbit_bf16_patched", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl
    Handle = interpreter.TensorHandle

    def widen(h: Handle) -> Handle:
        if h.dtype.scalar != tl.bfloat16:
            return h
        return Handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def bf16_bits(values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar != tl.bfloat16:
            src = widen(src)
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            return Handle(bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._lowbit_bf16_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16()


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests run: "cuda" when a GPU is present, else "cpu" (interpreted Triton)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
