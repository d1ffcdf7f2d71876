"""QuantizedWeight: codes + scales + zero points + layout, the one value every rounding method returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.int import dequantize_codes
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.formats.scheme import WeightScheme


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight matrix.

    Attributes:
        codes: int8 ``[out, in]``, signed codes in ``[scheme.qmin, scheme.qmax]``.
        scale: float32 ``[out, G]`` (``[1, 1]`` for a tensor scheme); G = in / columns per scale.
        zero: int8 ``[out, G]`` signed zero points, or None for a symmetric scheme.
        scheme: the scheme as applied to this layer (group fallback already resolved).
        scale_dtype: dtype the scales are stored in (their values are exact in it).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: WeightScheme
    scale_dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, ``[out, in]`` in ``dtype``."""
        return dequantize_codes(self.codes, self.scale, self.zero, dtype, self.scale_dtype)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (not valid for a tensor-wide scale, which all rows share)."""
        if self.scheme.strategy == "tensor":
            raise ValueError("a tensor-scaled weight cannot be split by rows")
        zero = None if self.zero is None else self.zero[start:stop].clone()
        return QuantizedWeight(self.codes[start:stop].clone(), self.scale[start:stop].clone(), zero, self.scheme, self.scale_dtype)

    def packed(self) -> torch.Tensor:
        """Codes packed along the input dimension: int32 ``[out, ceil(in*bits/32)]`` (see formats/packing.py)."""
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
        code_bits = out_f * math.ceil(in_f * self.scheme.bits / 32) * 32
        scale_bits = self.scale.numel() * torch.finfo(self.scale_dtype).bits
        zero_bits = 0 if self.zero is None else math.ceil(self.zero.shape[0] * self.scheme.bits / 32) * 32 * self.zero.shape[1]
        return code_bits + scale_bits + zero_bits
