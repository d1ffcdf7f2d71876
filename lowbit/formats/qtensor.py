"""QuantizedWeight: codes + scales + zero points + layout, the one value every rounding method returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.grid import GridParams, codes_to_values, dequantize_values
from lowbit.formats.packing import pack_codes
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme


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
        precision: the scale storage dtype ("float" scales are exact in it) and the model dtype ``w_hat`` is
            rounded to (formats/precision.py).
        global_scale: float32 ``[1]`` per-tensor divisor of "e4m3" scale formats, else None.
        channel_scale: float32 ``[out, 1]`` coarse scale of "dual" scales, else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: WeightScheme
    precision: Precision = Precision()
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
        """The weight the codes stand for, ``[out, in]``: rounded to the model dtype, returned in ``dtype``."""
        q = codes_to_values(self.codes, self.scheme)
        return dequantize_values(q, self.params, self.scheme, self.shape[1], self.precision.dtype).to(dtype)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (not valid for a tensor-wide scale, which all rows share)."""
        if self.scheme.strategy == "tensor":
            raise ValueError("a tensor-scaled weight cannot be split by rows")
        p = self.params.rows(start, stop)
        return QuantizedWeight(self.codes[start:stop].clone(), p.scale, p.zero, self.scheme, self.precision, p.global_scale, p.channel_scale)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Row blocks of one weight (the inverse of :meth:`rows`), stacked in order; not for a tensor-wide scale."""
        if len(parts) == 1:
            return parts[0]
        if parts[0].scheme.strategy == "tensor":
            raise ValueError("a tensor-scaled weight cannot be assembled from row blocks")

        def stack(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        first = parts[0]
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                               stack([p.zero for p in parts]), first.scheme, first.precision, first.global_scale,
                               stack([p.channel_scale for p in parts]))

    def packed(self) -> torch.Tensor:
        """Integer codes packed along the input dimension: int32 ``[out, ceil(in*bits/32)]`` (formats/packing.py)."""
        if self.scheme.format != "int":
            raise ValueError(f"{self.scheme.name} codes are not packed into int32 words")
        return pack_codes(self.codes, self.scheme.bits)
