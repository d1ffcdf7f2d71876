"""How a QuantizedWeight is stored: the tensors of each storage format, under compressed-tensors names.

docs/FORMAT.md is the spec. One storage format per scheme family:

=================================  ===============================================================================
format                             tensors (``G`` = groups per row)
=================================  ===============================================================================
pack-quantized (int, < 8 bits)     ``weight_packed`` int32 ``[out, ceil(in*b/32)]``, ``weight_scale`` ``[out, G]``
                                   scale dtype, ``weight_shape`` int64 ``[2]``, asymmetric: ``weight_zero_point``
                                   int32 ``[ceil(out*b/32), G]`` (packed along out)
int-quantized (int8)               ``weight`` int8 ``[out, in]``, ``weight_scale``, asymmetric: ``weight_zero_point``
                                   int8 ``[out, G]``
float-quantized (FP8)              ``weight`` float8_e4m3fn / float8_e5m2 ``[out, in]``, ``weight_scale`` scale dtype
nvfp4-pack-quantized               ``weight_packed`` uint8 ``[out, in/2]`` (even element in the low nibble),
                                   ``weight_scale`` float8_e4m3fn ``[out, G]``, ``weight_global_scale`` float32 ``[1]``
mxfp4-pack-quantized               ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` uint8 E8M0 ``[out, G]``
lowbit-fp6-pack-quantized          ``weight_packed_hi2`` uint8 ``[out, in/4]``, ``weight_packed_lo4`` uint8
                                   ``[out, in/2]`` (the 4+2 split, formats/blockfp.pack_fp6), ``weight_scale``
lowbit-dual-pack-quantized (DGQ)   pack-quantized codes and zero points, ``weight_scale`` int8 ``[out, G]`` (the
                                   multipliers ``m_g``), ``weight_channel_scale`` float32 ``[out, 1]``
lowbit-fp8scale-pack-quantized     pack-quantized codes (symmetric INT4), ``weight_scale`` float8_e4m3fn ``[out, G]``,
(FireQ)                            ``weight_global_scale`` float32 ``[1]`` (a power of two, a divisor)
=================================  ===============================================================================

"scale dtype": the precision's ``scale_dtype`` (formats/precision.py), the model dtype for 16-bit models and
float16 for float32 models by default; ``tensor`` strategies have one row of scales and zero points.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats.blockfp import pack_fp4, pack_fp6, unpack_fp4, unpack_fp6
from lowbit.formats.fp import decode_e8m0, e8m0_exponent
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.formats.precision import Precision
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import WeightScheme

PACKED = "pack-quantized"
INT = "int-quantized"
FLOAT8 = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
MXFP4 = "mxfp4-pack-quantized"
FP6 = "lowbit-fp6-pack-quantized"
DUAL = "lowbit-dual-pack-quantized"
FP8SCALE = "lowbit-fp8scale-pack-quantized"
STORAGE_FORMATS = (PACKED, INT, FLOAT8, NVFP4, MXFP4, FP6, DUAL, FP8SCALE)
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def storage_format(scheme: WeightScheme) -> str:
    """The storage format of a scheme, or a LowbitError for a grid that has none."""
    fmt = None
    if scheme.format == "int":
        fmt = {"float": INT if scheme.bits == 8 else PACKED, "dual": DUAL, "e4m3": FP8SCALE}.get(scheme.scale_format)
        if fmt in (DUAL, FP8SCALE) and scheme.bits != 4:
            fmt = None
    elif scheme.bits == 8 and scheme.scale_format == "float":
        fmt = FLOAT8
    elif scheme.bits == 6 and scheme.scale_format == "float":
        fmt = FP6
    elif scheme.bits == 4:
        fmt = {"e4m3": NVFP4, "e8m0": MXFP4}.get(scheme.scale_format)
    if fmt is None:
        raise LowbitError(f"no storage format for {scheme.name}")
    return fmt


# Formats whose ``weight_scale`` holds float scales, stored in the precision's scale dtype (formats/precision.py);
# the others store their scales in a fixed format (E4M3, E8M0, INT8 multipliers).
FLOAT_SCALES = (PACKED, INT, FLOAT8, FP6)


def _groups(scheme: WeightScheme, out_f: int, in_f: int) -> tuple[int, int]:
    rows = 1 if scheme.strategy == "tensor" else out_f
    return rows, (in_f // scheme.columns_per_scale(in_f) if scheme.strategy == "group" else 1)


def buffer_specs(
    scheme: WeightScheme, out_f: int, in_f: int, scale_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a layer of ``scheme`` stores (the table in the module docstring);
    float scales in ``scale_dtype``. :func:`to_buffers` writes exactly these (tested)."""
    fmt = storage_format(scheme)
    rows, G = _groups(scheme, out_f, in_f)
    if fmt in (NVFP4, MXFP4, FP6) and in_f % (4 if fmt == FP6 else 2):
        raise LowbitError(f"{fmt} needs in_features divisible by {4 if fmt == FP6 else 2}, got {in_f}")
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if fmt in (PACKED, DUAL, FP8SCALE):
        specs["weight_packed"] = ((out_f, -(-in_f * scheme.bits // 32)), torch.int32)
        specs["weight_shape"] = ((2,), torch.int64)
    elif fmt == INT:
        specs["weight"] = ((out_f, in_f), torch.int8)
    elif fmt == FLOAT8:
        specs["weight"] = ((out_f, in_f), FP8_DTYPES[scheme.fp or ""])
    elif fmt in (NVFP4, MXFP4):
        specs["weight_packed"] = ((out_f, in_f // 2), torch.uint8)
    else:
        specs["weight_packed_hi2"] = ((out_f, in_f // 4), torch.uint8)
        specs["weight_packed_lo4"] = ((out_f, in_f // 2), torch.uint8)
    fixed = {NVFP4: torch.float8_e4m3fn, FP8SCALE: torch.float8_e4m3fn, MXFP4: torch.uint8, DUAL: torch.int8}
    specs["weight_scale"] = ((rows, G), fixed.get(fmt, scale_dtype))
    if fmt in (NVFP4, FP8SCALE):
        specs["weight_global_scale"] = ((1,), torch.float32)
    if fmt == DUAL:
        specs["weight_channel_scale"] = ((out_f, 1), torch.float32)
    if not scheme.symmetric:  # int8 [rows, G], or packed along rows into int32 words
        specs["weight_zero_point"] = ((rows, G), torch.int8) if fmt == INT else ((-(-rows * scheme.bits // 32), G), torch.int32)
    return specs


def stored_bits(scheme: WeightScheme, out_f: int, in_f: int, scale_dtype: torch.dtype) -> int:
    """Bits a layer of ``scheme`` takes in the checkpoint: every tensor of :func:`buffer_specs`, whole words."""
    specs = buffer_specs(scheme, out_f, in_f, scale_dtype).values()
    return sum(math.prod(shape) * dtype.itemsize * 8 for shape, dtype in specs)


def empty_buffers(scheme: WeightScheme, out_f: int, in_f: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero-filled tensors of the right names, shapes and dtypes for a layer (loading fills them)."""
    b = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in buffer_specs(scheme, out_f, in_f, scale_dtype).items()}
    if "weight_shape" in b:
        b["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    for name in ("weight_global_scale", "weight_channel_scale"):
        if name in b:
            b[name].fill_(1.0)
    return b


def to_buffers(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The stored tensors of ``qw``; float scales in ``qw.precision.scale_dtype``, which must hold them exactly
    (a scale rounded here would dequantize to other weights than the rounding method simulated)."""
    s = qw.scheme
    fmt = storage_format(s)
    b: dict[str, torch.Tensor] = {}
    if fmt in (PACKED, DUAL, FP8SCALE):
        b["weight_packed"] = qw.packed()
        b["weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
    elif fmt == INT:
        b["weight"] = qw.codes
    elif fmt == FLOAT8:
        b["weight"] = qw.codes.view(FP8_DTYPES[s.fp or ""])
    elif fmt in (NVFP4, MXFP4):
        b["weight_packed"] = pack_fp4(qw.codes)
    else:
        b["weight_packed_hi2"], b["weight_packed_lo4"] = pack_fp6(qw.codes)
    if fmt in (NVFP4, FP8SCALE):
        b["weight_scale"] = qw.scale.to(torch.float8_e4m3fn)  # exact: E4M3 values
        b["weight_global_scale"] = qw.global_scale.float().reshape(1)  # type: ignore[union-attr]
    elif fmt == MXFP4:
        b["weight_scale"] = e8m0_exponent(qw.scale)
    elif fmt == DUAL:
        b["weight_scale"] = qw.scale.to(torch.int8)
        b["weight_channel_scale"] = qw.channel_scale.float()  # type: ignore[union-attr]
    else:
        b["weight_scale"] = qw.scale.to(qw.precision.scale_dtype)
        if not torch.equal(b["weight_scale"].float(), qw.scale.float()):
            raise ValueError(f"scales of a {s.name} weight are not exact in {qw.precision.scale_dtype}")
    if qw.zero is not None:
        b["weight_zero_point"] = qw.zero if fmt == INT else pack_codes(qw.zero, s.bits, dim=0)
    return b


def unpack_zero(zero: torch.Tensor | None, fmt: str, bits: int, rows: int) -> torch.Tensor | None:
    """Signed int8 zero points ``[rows, G]`` from a stored ``weight_zero_point`` (packed along rows except in
    the int-quantized format), or None for a symmetric weight."""
    if zero is None or fmt == INT:
        return zero
    return unpack_codes(zero, bits, rows, dim=0)


def from_buffers(b: dict[str, torch.Tensor], scheme: WeightScheme, out_f: int, in_f: int, dtype: torch.dtype) -> QuantizedWeight:
    """Inverse of :func:`to_buffers`, for a model of ``dtype`` (the scale dtype is that of the stored scales)."""
    fmt = storage_format(scheme)
    precision = Precision(dtype, b["weight_scale"].dtype if fmt in FLOAT_SCALES else dtype)
    if fmt in (PACKED, DUAL, FP8SCALE):
        codes = unpack_codes(b["weight_packed"], scheme.bits, in_f)
    elif fmt == INT:
        codes = b["weight"]
    elif fmt == FLOAT8:
        codes = b["weight"].view(torch.uint8)
    elif fmt in (NVFP4, MXFP4):
        codes = unpack_fp4(b["weight_packed"])
    else:
        codes = unpack_fp6(b["weight_packed_hi2"], b["weight_packed_lo4"])
    scale = decode_e8m0(b["weight_scale"]) if fmt == MXFP4 else b["weight_scale"].float()
    zero = unpack_zero(b.get("weight_zero_point"), fmt, scheme.bits, scale.shape[0])
    return QuantizedWeight(codes, scale, zero, scheme, precision, b.get("weight_global_scale"), b.get("weight_channel_scale"))
