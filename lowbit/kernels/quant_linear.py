"""QuantLinear: a linear layer that holds packed weights, dequantizes them and, for A8 schemes,
quantizes its input per token — the torch reference path that the Triton kernels will sit behind.

Its buffers carry the compressed-tensors names, so ``state_dict()`` *is* the checkpoint content:

* "pack-quantized": ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` (formats/packing.py),
  ``weight_scale`` ``[out, G]`` in the model dtype, ``weight_shape`` int64 ``[2]`` and, when asymmetric,
  ``weight_zero_point`` int32 ``[ceil(out*bits/32), G]`` (signed zero points packed along the output dim);
* "int-quantized" (8-bit): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, G]``, and when
  asymmetric ``weight_zero_point`` int8 ``[out, G]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.int import quantize_activation_per_token
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import ActScheme, WeightScheme

PACKED = "pack-quantized"
INT = "int-quantized"


def storage_format(scheme: WeightScheme) -> str:
    """compressed-tensors format for a weight scheme: 8-bit codes are stored unpacked as int8."""
    return INT if scheme.bits == 8 else PACKED


class QuantLinear(nn.Module):
    """``y = q(x) @ W_hat^T + b`` with ``W_hat`` decoded from stored codes.

    Args:
        in_features, out_features: the float layer's shape.
        scheme: weight scheme as applied to this layer (group fallback resolved).
        act: activation scheme or None for weight-only.
        dtype: the model's float dtype: scales, bias and the dequantized weight use it.
        bias: whether the layer has a bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: WeightScheme,
        act: ActScheme | None,
        dtype: torch.dtype = torch.float32,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.act, self.dtype = scheme, act, dtype
        self.format = storage_format(scheme)
        n_groups = 1 if scheme.strategy != "group" else in_features // scheme.columns_per_scale(in_features)
        scale_rows = 1 if scheme.strategy == "tensor" else out_features
        if self.format == PACKED:
            words = -(-in_features * scheme.bits // 32)
            self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(scale_rows, n_groups, dtype=dtype))
        if not scheme.symmetric:
            zp = torch.zeros(scale_rows, n_groups, dtype=torch.int8)
            self.register_buffer("weight_zero_point", pack_codes(zp, scheme.bits, dim=0) if self.format == PACKED else zp)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._w_hat: torch.Tensor | None = None  # dequantized weight cache (reference path only)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, act: ActScheme | None, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> "QuantLinear":
        """Build a layer holding ``qw`` (and a float ``bias [out]``)."""
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.scheme, act, dtype, bias is not None)
        layer.set_quantized(qw)
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Store ``qw``'s codes, scales and zero points in this layer's buffers."""
        if self.format == PACKED:
            self.weight_packed.copy_(qw.packed())
        else:
            self.weight.copy_(qw.codes)
        self.weight_scale.copy_(qw.scale.to(self.dtype))
        if qw.zero is not None:
            zp = pack_codes(qw.zero, self.scheme.bits, dim=0) if self.format == PACKED else qw.zero
            self.weight_zero_point.copy_(zp)
        self._w_hat = None

    def quantized_weight(self) -> QuantizedWeight:
        """Decode the buffers back to a QuantizedWeight."""
        if self.format == PACKED:
            codes = unpack_codes(self.weight_packed, self.scheme.bits, self.in_features)
        else:
            codes = self.weight
        zero = getattr(self, "weight_zero_point", None)
        if zero is not None and self.format == PACKED:
            zero = unpack_codes(zero, self.scheme.bits, self.weight_scale.shape[0], dim=0)
        return QuantizedWeight(codes, self.weight_scale.float(), zero, self.scheme, self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """``W_hat [out, in]`` in the model dtype, decoded once and cached (the reference path trades memory for speed)."""
        if self._w_hat is None:
            self._w_hat = self.quantized_weight().dequantize(self.dtype)
        return self._w_hat

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._w_hat = None  # new codes invalidate the cache
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` in the model dtype -> ``[..., out]``."""
        if self.act is not None:
            q, s = quantize_activation_per_token(x, self.act.bits)
            x = (q.float() * s).to(x.dtype)  # simulate the INT8 GEMM input exactly
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a = "none" if self.act is None else f"int{self.act.bits}/{self.act.strategy}"
        g = f" g{self.scheme.group_size}" if self.scheme.strategy == "group" else f" {self.scheme.strategy}"
        sym = "sym" if self.scheme.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, w=int{self.scheme.bits}{g} {sym}, a={a}"
