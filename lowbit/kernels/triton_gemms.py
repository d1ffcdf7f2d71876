"""Which Triton GEMM runs a QuantLinear, and the per-layer tensors it needs (docs/KERNELS.md).

``prepare`` derives, once per layer and device, from a layer's scheme and stored tensors (the buffers of a
QuantLinear, which calls it: this module does not know the layer class), the extra tensors a kernel takes (unpacked zero points,
float32 scale columns, the reciprocal of a global divisor) or returns ``()`` where no kernel covers the
layer's format and activations; ``run`` launches. Kernel modules are imported here lazily so that the
torch path never imports Triton.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.formats.storage import DUAL, FLOAT8, FP6, FP8SCALE, INT, MXFP4, NVFP4, PACKED, unpack_zero

MX_BLOCK, NV_BLOCK = 32, 16
# Where each kernel beat torch's fp16 matmul on the H200, on every Llama-2-7B / Llama-3-8B shape of
# benchmarks/kernels.py (BENCHMARKS.md): the token counts M of MEASURED_M at which it won. Between two measured
# points "auto" runs the kernel only if it won at both; elsewhere it takes the dequantized-weight path (the
# fp16 matmul on a cached decoded weight), so no layer runs slower than fp16. An explicit "triton" backend
# always runs the kernel. None: not measured, the kernel always runs.
# Measured 2026-11-28 on the code of commit 0848ccf (BENCHMARKS.md, kernel speed of that date and commit): only
# W4A16 at M = 1 beat fp16 on every shape; elsewhere "auto" on CUDA takes the cached fp16 weight (fp16
# memory!), and backend="triton" keeps the packed weights. Measured for fp16 activations, symmetric INT4,
# group 128.
MEASURED_M = (1, 16, 64, 256, 1024, 4096)
FASTER_THAN_FP16: dict[str, frozenset[int] | None] = {
    "w4a16": frozenset({1}), **{kind: frozenset() for kind in ("fp4", "fp6", "w8a8_int8", "w8a8_fp8", "a8w4", "int4_fp8")}
}

def prepare(
    scheme: WeightScheme, act: ActScheme | None, fmt: str, in_features: int, stored: Mapping[str, torch.Tensor]
) -> tuple[Any, ...]:
    """The kernel's name and per-layer arguments for a layer of ``scheme`` / ``act`` stored as ``fmt`` (its
    tensors ``stored``, by their checkpoint names), or ``()`` when the layer takes the torch path."""
    s = scheme
    if s.strategy == "tensor":
        return ()
    # The kernels quantize activations 8-bit symmetric per token, unclipped (INT8 or FP8): any other activation
    # scheme (INT4, per group, asymmetric, clipped) takes the torch path.
    if act is not None and not (act.bits == 8 and act.strategy == "token" and act.symmetric and act.clip_ratio == 1.0):
        return ()
    group = s.columns_per_scale(in_features)
    scale = stored["weight_scale"]
    zero = unpack_zero(stored.get("weight_zero_point"), fmt, s.bits, scale.shape[0])
    # INT4 kernels read whole int32 words (8 codes) that never straddle a group.
    words_ok = in_features % 8 == 0 and group % 8 == 0
    if fmt in (PACKED, DUAL, FP8SCALE) and not words_ok:
        return ()
    if fmt == PACKED and s.bits == 4 and act is None:
        return ("w4a16", stored["weight_packed"], scale, zero, group)
    if fmt in (INT, FLOAT8) and act is not None and s.strategy == "channel" and s.symmetric:
        if (fmt == INT) != (act.format == "int") or (fmt == FLOAT8 and s.fp != "e4m3"):
            return ()
        kind = "w8a8_int8" if fmt == INT else "w8a8_fp8"
        return (kind, stored["weight"], scale.float().reshape(-1, 1).contiguous())
    if fmt == MXFP4 and act is None and group == MX_BLOCK:
        return ("fp4", stored["weight_packed"], scale, None, MX_BLOCK)
    if fmt == NVFP4 and act is None and group == NV_BLOCK:
        g = (1.0 / stored["weight_global_scale"].float()).reshape(1).contiguous()  # stored as a divisor
        return ("fp4", stored["weight_packed"], scale, g, NV_BLOCK)
    if fmt == FP6 and act is None and s.strategy == "channel":
        return ("fp6", stored["weight_packed_hi2"], stored["weight_packed_lo4"], scale, s.fp)
    if fmt == DUAL and act is not None and act.format == "int":
        return ("a8w4", stored["weight_packed"], scale, zero, stored["weight_channel_scale"], group)
    if fmt == FP8SCALE and act is not None and act.format == "float":
        g = (1.0 / stored["weight_global_scale"].float()).reshape(1).contiguous()
        return ("int4_fp8", stored["weight_packed"], scale, g, group)
    return ()


def wins(kind: str, M: int) -> bool:
    """Whether kernel ``kind`` was measured faster than the fp16 matmul at ``M`` tokens (both measured
    neighbours of ``M`` won; beyond the largest measured M, the largest)."""
    won = FASTER_THAN_FP16.get(kind)
    if won is None:
        return True
    below = max((m for m in MEASURED_M if m <= M), default=MEASURED_M[0])
    above = min((m for m in MEASURED_M if m >= M), default=MEASURED_M[-1])
    return below in won and above in won


def run(x: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
    """``x [M, K]`` (contiguous, model dtype) through the prepared kernel: ``[M, N]`` in ``x.dtype``."""
    kind, rest = args[0], args[1:]
    out = x.dtype
    if kind == "w4a16":
        from lowbit.kernels.w4a16 import w4a16_triton

        return w4a16_triton(x, *rest, out_dtype=out)
    if kind == "fp4":
        from lowbit.kernels.fp_weight import fp4_triton

        return fp4_triton(x, *rest, out_dtype=out)
    if kind == "fp6":
        from lowbit.kernels.fp_weight import fp6_triton

        return fp6_triton(x, *rest, out_dtype=out)
    from lowbit.kernels import w8a8

    if kind in ("w8a8_int8", "w8a8_fp8"):
        w, ws = rest
        quant = w8a8.quantize_per_token_int8_triton if kind == "w8a8_int8" else w8a8.quantize_per_token_fp8_triton
        xq, xs = quant(x)
        return w8a8.scaled_mm_triton(xq, xs, w, ws, out_dtype=out)
    if kind == "a8w4":
        from lowbit.kernels.a8w4 import a8w4_triton

        xq, xs = w8a8.quantize_per_token_int8_triton(x)
        return a8w4_triton(xq, xs, *rest, out_dtype=out)
    from lowbit.kernels.int4_fp8 import int4_fp8_triton

    xq, xs = w8a8.quantize_per_token_fp8_triton(x)
    return int4_fp8_triton(xq, xs, *rest, out_dtype=out)
