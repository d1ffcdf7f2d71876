"""GPTQ's column loop within one lazy block, in C (csrc/gptq_columns.c) on row slices in parallel.

The torch loop in lowbit/quantize/gptq.py is the reference and the fallback; this one gives the same bits
(tests/native/test_gptq_columns.py) for the plain integer grid, with dequantized values rounded to a float32,
float16 or bfloat16 model dtype (formats/precision.py).
"""

from __future__ import annotations

import ctypes

import torch

from lowbit import native

# Model dtypes the kernel rounds dequantized values to (csrc: to_kind), and the code passed for each.
DTYPE_KINDS: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MIN_ROWS_PER_THREAD = 256  # below this a second thread costs more than it saves


def _lib() -> ctypes.CDLL | None:
    lib = native.load("gptq_columns")
    if lib is not None and lib.gptq_columns.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.gptq_columns.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64,
                                     ctypes.c_float, ctypes.c_float, ctypes.c_int, ptr, ptr]
        lib.gptq_columns.restype = None
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether the C loop can run for a model of ``dtype`` (compiler found, build succeeded)."""
    return dtype in DTYPE_KINDS and _lib() is not None


def gptq_columns(
    W1T: torch.Tensor, U1: torch.Tensor, i0: int, i1: int, s: torch.Tensor, z: torch.Tensor | None,
    qmin: float, qmax: float, dtype: torch.dtype, Q: torch.Tensor, E: torch.Tensor, threads: int = 1,
) -> None:
    """Round columns ``i0 .. i1 - 1`` of a block and propagate their errors to its later columns, in place.

    Args:
        W1T: float32 ``[nb, rows]`` contiguous, the block transposed (row k = the block's column k); its
            rows after each processed column receive that column's compensation.
        U1: float32 ``[nb, nb]`` contiguous, the block of GPTQ's upper inverse-Hessian factor.
        s: float32 scales, ``[rows]`` shared by these columns or ``[nb, rows]`` one per column, contiguous.
        z: float32 zero points shaped like ``s``, or None for a symmetric grid.
        qmin, qmax: the integer grid's range (zero point included for asymmetric grids).
        dtype: the model dtype, float32, float16 or bfloat16: dequantized values are rounded to it, as the
            loaders compute them (formats/precision.py).
        Q, E: float32 ``[nb, rows]`` contiguous outputs: grid values and errors ``(w - dq) / U1[i, i]``
            (three separate tensors: overlapping W1T, Q and E would give wrong numbers).
        threads: row slices computed at once (rows are independent; the GIL is released in the C call).
    """
    lib = _lib()
    if lib is None or dtype not in DTYPE_KINDS:
        raise RuntimeError("the native GPTQ column loop is not available (see lowbit.native)")
    nb, rows = W1T.shape
    for t in (W1T, U1, s, Q, E) + (() if z is None else (z,)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("gptq_columns needs contiguous float32 CPU tensors")
    if U1.shape != (nb, nb) or Q.shape != W1T.shape or E.shape != W1T.shape or s.shape not in ((rows,), (nb, rows)):
        raise ValueError(f"shapes do not match: W1T {tuple(W1T.shape)}, U1 {tuple(U1.shape)}, s {tuple(s.shape)}")
    if not 0 <= i0 <= i1 <= nb:
        raise ValueError(f"columns {i0}..{i1} outside a block of {nb}")
    if z is not None and z.shape != s.shape:
        raise ValueError(f"z {tuple(z.shape)} must be shaped like s {tuple(s.shape)}")
    s_step = rows if s.dim() == 2 else 0
    kind = DTYPE_KINDS[dtype]

    def run(r0: int, r1: int) -> None:
        off = 4 * r0  # bytes
        lib.gptq_columns(W1T.data_ptr() + off, rows, r1 - r0, U1.data_ptr(), nb, nb, i0, i1,
                         s.data_ptr() + off, s_step, None if z is None else z.data_ptr() + off, s_step,
                         qmin, qmax, kind, Q.data_ptr() + off, E.data_ptr() + off)

    native.over_row_slices(run, rows, threads, MIN_ROWS_PER_THREAD)
