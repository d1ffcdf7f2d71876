"""Which Triton GEMM runs a QuantLinear, and the per-layer tensors it needs (docs/KERNELS.md).

``prepare`` derives, once per layer and device, the extra tensors a kernel takes (unpacked zero points,
float32 scale columns, the reciprocal of a global divisor) or returns ``()`` where no kernel covers the
layer's format and activations; ``run`` launches. Kernel modules are imported here lazily so that the
torch path never imports Triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowbit.formats.packing import unpack_codes
from lowbit.formats.storage import DUAL, FLOAT8, FP6, FP8SCALE, INT, MXFP4, NVFP4, PACKED

if TYPE_CHECKING:
    from lowbit.kernels.quant_linear import QuantLinear

MX_BLOCK, NV_BLOCK = 32, 16


def _group(layer: "QuantLinear") -> int:
    return layer.scheme.columns_per_scale(layer.in_features) if layer.scheme.strategy == "group" else layer.in_features


def _zero(layer: "QuantLinear") -> torch.Tensor | None:
    zp = getattr(layer, "weight_zero_point", None)
    if zp is None:
        return None
    return unpack_codes(zp, layer.scheme.bits, layer.weight_scale.shape[0], dim=0) if layer.format != INT else zp


def prepare(layer: "QuantLinear") -> tuple[Any, ...]:
    """The kernel's name and per-layer arguments, or ``()`` when the layer takes the torch path."""
    s, act, fmt = layer.scheme, layer.act, layer.format
    tensor_scale = s.strategy == "tensor"
    if tensor_scale:
        return ()
    if fmt == PACKED and s.bits == 4 and act is None:
        return ("w4a16", layer.weight_packed, layer.weight_scale, _zero(layer), _group(layer))
    if fmt in (INT, FLOAT8) and act is not None and s.strategy == "channel" and s.symmetric:
        if (fmt == INT) != (act.format == "int") or (fmt == FLOAT8 and s.fp != "e4m3"):
            return ()
        return ("scaled_mm", act.format, layer.weight, layer.weight_scale.float().reshape(-1, 1).contiguous())
    if fmt == MXFP4 and act is None and _group(layer) == MX_BLOCK:
        return ("fp4", layer.weight_packed, layer.weight_scale, None, MX_BLOCK)
    if fmt == NVFP4 and act is None and _group(layer) == NV_BLOCK:
        g = (1.0 / layer.weight_global_scale.float()).reshape(1).contiguous()  # stored as a divisor
        return ("fp4", layer.weight_packed, layer.weight_scale, g, NV_BLOCK)
    if fmt == FP6 and act is None and s.strategy == "channel":
        return ("fp6", layer.weight_packed_hi2, layer.weight_packed_lo4, layer.weight_scale, s.fp)
    if fmt == DUAL and act is not None and act.format == "int":
        return ("a8w4", layer.weight_packed, layer.weight_scale, _zero(layer), layer.weight_channel_scale, _group(layer))
    if fmt == FP8SCALE and act is not None and act.format == "float":
        g = (1.0 / layer.weight_global_scale.float()).reshape(1).contiguous()
        return ("int4_fp8", layer.weight_packed, layer.weight_scale, g, _group(layer))
    return ()


def run(layer: "QuantLinear", x: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
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

    if kind == "scaled_mm":
        act_format, w, ws = rest
        quant = w8a8.quantize_per_token_int8_triton if act_format == "int" else w8a8.quantize_per_token_fp8_triton
        xq, xs = quant(x)
        return w8a8.scaled_mm_triton(xq, xs, w, ws, out_dtype=out)
    if kind == "a8w4":
        from lowbit.kernels.a8w4 import a8w4_triton

        xq, xs = w8a8.quantize_per_token_int8_triton(x)
        return a8w4_triton(xq, xs, *rest, out_dtype=out)
    from lowbit.kernels.int4_fp8 import int4_fp8_triton

    xq, xs = w8a8.quantize_per_token_fp8_triton(x)
    return int4_fp8_triton(xq, xs, *rest, out_dtype=out)
