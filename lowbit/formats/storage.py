"""How a QuantizedWeight is stored: the tensors of each storage format, under compressed-tensors names.

docs/FORMAT.md is the spec. One storage format per scheme family:

=================================  ===============================================================================
format                             tensors (``G`` = groups per row)
=================================  ===============================================================================
pack-quantized (int, < 8 bits)     ``weight_packed`` int32 ``[out, ceil(in*b/32)]``, ``weight_scale`` ``[out, G]``
                                   model dtype, ``weight_shape`` int64 ``[2]``, asymmetric: ``weight_zero_point``
                                   int32 ``[ceil(out*b/32), G]`` (packed along out)
int-quantized (int8)               ``weight`` int8 ``[out, in]``, ``weight_scale``, asymmetric: ``weight_zero_point``
                                   int8 ``[out, G]``
float-quantized (FP8)              ``weight`` float8_e4m3fn / float8_e5m2 ``[out, in]``, ``weight_scale`` model dtype
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
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.blockfp import pack_fp4, pack_fp6, unpack_fp4, unpack_fp6
from lowbit.formats.fp import decode_e8m0, e8m0_exponent
from lowbit.formats.packing import pack_codes, unpack_codes
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


def _groups(scheme: WeightScheme, out_f: int, in_f: int) -> tuple[int, int]:
    rows = 1 if scheme.strategy == "tensor" else out_f
    return rows, (in_f // scheme.columns_per_scale(in_f) if scheme.strategy == "group" else 1)


def empty_buffers(scheme: WeightScheme, out_f: int, in_f: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero-filled tensors of the right names, shapes and dtypes for a layer (loading fills them)."""
    fmt = storage_format(scheme)
    rows, G = _groups(scheme, out_f, in_f)
    if fmt in (NVFP4, MXFP4, FP6) and in_f % (4 if fmt == FP6 else 2):
        raise LowbitError(f"{fmt} needs in_features divisible by {4 if fmt == FP6 else 2}, got {in_f}")
    b: dict[str, torch.Tensor] = {}
    if fmt in (PACKED, DUAL, FP8SCALE):
        b["weight_packed"] = torch.zeros(out_f, -(-in_f * scheme.bits // 32), dtype=torch.int32)
        b["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    elif fmt == INT:
        b["weight"] = torch.zeros(out_f, in_f, dtype=torch.int8)
    elif fmt == FLOAT8:
        b["weight"] = torch.zeros(out_f, in_f, dtype=FP8_DTYPES[scheme.fp or ""])
    elif fmt in (NVFP4, MXFP4):
        b["weight_packed"] = torch.zeros(out_f, in_f // 2, dtype=torch.uint8)
    else:
        b["weight_packed_hi2"] = torch.zeros(out_f, in_f // 4, dtype=torch.uint8)
        b["weight_packed_lo4"] = torch.zeros(out_f, in_f // 2, dtype=torch.uint8)
    scale_dtype = {NVFP4: torch.float8_e4m3fn, FP8SCALE: torch.float8_e4m3fn, MXFP4: torch.uint8, DUAL: torch.int8}.get(fmt, dtype)
    b["weight_scale"] = torch.zeros(rows, G, dtype=scale_dtype)
    if fmt in (NVFP4, FP8SCALE):
        b["weight_global_scale"] = torch.ones(1, dtype=torch.float32)
    if fmt == DUAL:
        b["weight_channel_scale"] = torch.ones(out_f, 1, dtype=torch.float32)
    if not scheme.symmetric:
        zp = torch.zeros(rows, G, dtype=torch.int8)
        b["weight_zero_point"] = zp if fmt == INT else pack_codes(zp, scheme.bits, dim=0)
    return b


def to_buffers(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of ``qw`` (``dtype``: the model dtype of "float" scales)."""
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
        b["weight_scale"] = qw.scale.to(dtype)
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
    """Inverse of :func:`to_buffers`."""
    fmt = storage_format(scheme)
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
    return QuantizedWeight(codes, scale, zero, scheme, dtype, b.get("weight_global_scale"), b.get("weight_channel_scale"))
