"""QuantizedWeight: codes + scales + zero points + layout, the one value every rounding method returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.grid import GridParams, codes_to_values, dequantize_values
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.formats.scheme import WeightScheme

# Bits of one stored scale by scale format ("float" scales take the scale dtype's width).
_SCALE_BITS = {"e8m0": 8, "e4m3": 8, "dual": 8}


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight matrix.

    Attributes:
        codes: int grids: int8 ``[out, in]``, signed codes in ``[scheme.qmin, scheme.qmax]``; float grids:
            uint8 ``[out, in]``, the element bit patterns (formats/fp.py).
        scale: float32 ``[out, G]`` (``[1, 1]`` for a tensor scheme); G = in / columns per scale. Its meaning
            follows ``scheme.scale_format`` (formats/grid.py).
        zero: int8 ``[out, G]`` signed zero points, or None for a symmetric scheme.
        scheme: the scheme as applied to this layer (group fallback already resolved).
        scale_dtype: the model dtype: "float" scales are exact in it and ``w_hat`` is rounded to it.
        global_scale: float32 ``[1]`` per-tensor divisor of "e4m3" scale formats, else None.
        channel_scale: float32 ``[out, 1]`` coarse scale of "dual" scales, else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: WeightScheme
    scale_dtype: torch.dtype = torch.float32
    global_scale: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None

    @property
    def params(self) -> GridParams:
        """The grid parameters (formats/grid.py)."""
        return GridParams(self.scale, self.zero, self.global_scale, self.channel_scale)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, ``[out, in]`` in ``dtype``."""
        q = codes_to_values(self.codes, self.scheme)
        return dequantize_values(q, self.params, self.scheme, self.shape[1], self.scale_dtype).to(dtype)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (not valid for a tensor-wide scale, which all rows share)."""
        if self.scheme.strategy == "tensor":
            raise ValueError("a tensor-scaled weight cannot be split by rows")
        p = self.params.rows(start, stop)
        return QuantizedWeight(self.codes[start:stop].clone(), p.scale, p.zero, self.scheme, self.scale_dtype, p.global_scale, p.channel_scale)

    def packed(self) -> torch.Tensor:
        """Integer codes packed along the input dimension: int32 ``[out, ceil(in*bits/32)]`` (formats/packing.py)."""
        if self.scheme.format != "int":
            raise ValueError(f"{self.scheme.name} codes are not packed into int32 words")
        return pack_codes(self.codes, self.scheme.bits)

    @staticmethod
    def from_packed(
        packed: torch.Tensor,
        shape: tuple[int, int],
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        scheme: WeightScheme,
    ) -> "QuantizedWeight":
        """Rebuild from int32 ``[out, ceil(in*bits/32)]`` words, as read from a checkpoint."""
        codes = unpack_codes(packed, scheme.bits, shape[1])
        return QuantizedWeight(codes, scale.float(), zero, scheme, scale.dtype)

    def storage_bits(self) -> int:
        """Bits this weight takes on disk: packed codes, scales (in scale_dtype) and packed zero points."""
        out_f, in_f = self.shape
        if self.scheme.format == "int":
            code_bits = out_f * math.ceil(in_f * self.scheme.bits / 32) * 32
        else:
            code_bits = out_f * in_f * self.scheme.bits
        per_scale = _SCALE_BITS.get(self.scheme.scale_format, torch.finfo(self.scale_dtype).bits)
        scale_bits = self.scale.numel() * per_scale
        zero_bits = 0 if self.zero is None else math.ceil(self.zero.shape[0] * self.scheme.bits / 32) * 32 * self.zero.shape[1]
        extra = sum(32 * t.numel() for t in (self.global_scale, self.channel_scale) if t is not None)
        return code_bits + scale_bits + zero_bits + extra
