"""QuantLinear: a linear layer that holds a quantized weight in its stored form and runs it.

Its buffers carry the compressed-tensors names of formats/storage.py, so ``state_dict()`` *is* the
checkpoint content. ``forward`` takes one of two paths, chosen by kernels/dispatch.py:

* torch (the reference and CPU fallback): the weight is decoded once with the shared grid primitives and
  cached, activations are quantized and dequantized per token (the fake-quant simulation), then ``F.linear``;
* triton: the packed tensors go straight to the format's Triton GEMM (docs/KERNELS.md); a format/activation
  pair without a kernel takes the torch path.

Either way an online input transform (kernels/online.py, a ``*_input`` child such as ``R4_input``) rotates
``x`` first, so the activations are quantized in the rotated basis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.fp import quantize_activation_per_token_fp8
from lowbit.formats.int import fake_quantize_activation_int
from lowbit.formats.qtensor import QuantizedWeight
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.formats.storage import FLOAT_SCALES, INT, PACKED, empty_buffers, from_buffers, storage_format, to_buffers
from lowbit.kernels.dispatch import Backend, resolve_backend
from lowbit.kernels.online import OnlineHadamard, input_transform

__all__ = ["QuantLinear", "storage_format", "PACKED", "INT", "fake_quantize_activation"]


def fake_quantize_activation(x: torch.Tensor, act: ActScheme, ste: bool = False) -> torch.Tensor:
    """``x [..., K]`` quantized dynamically along its last dimension and dequantized, in ``x.dtype``: exactly the
    GEMM's input. Any leading shape (``[b, L, K]``, a KV cache's ``[b, heads, L, head_dim]``...).

    INT4/INT8, per token or per group, symmetric or asymmetric, clipped: compressed-tensors' conventions
    (formats/int.py ``quantize_activation``; symmetric INT8 is ``absmax / 127.5``); FP8: per token,
    ``s = absmax / 448``, ``q = e4m3(x / s)`` (round to nearest even, saturating).

    ``ste``: the same values with a straight-through gradient, for training transforms through the quantizer
    (INT: through the rounding only; FP8: through the whole quantizer).
    """
    if act.format == "int":
        act.check_features(x.shape[-1], "activations")
        return fake_quantize_activation_int(x, act.bits, act.group_size, act.symmetric, act.clip_ratio, ste)
    q, s = quantize_activation_per_token_fp8(x.detach() if ste else x)
    y = (q.float() * s).to(x.dtype)
    return x + (y - x).detach() if ste else y


class QuantLinear(nn.Module):
    """``y = q(x) @ W_hat^T + b`` with ``W_hat`` decoded from stored codes.

    Args:
        in_features, out_features: the float layer's shape.
        scheme: weight scheme as applied to this layer (group fallback resolved).
        act: activation scheme or None for weight-only.
        dtype: the model's float dtype: the bias, the output and the dequantized weight use it.
        bias: whether the layer has a bias.
        backend: kernel choice (kernels/dispatch.py), resolved per call from the input's device.
        scale_dtype: dtype of the stored float scales (formats/precision.py); None: ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: WeightScheme,
        act: ActScheme | None,
        dtype: torch.dtype = torch.float32,
        bias: bool = False,
        backend: Backend | str = Backend.AUTO,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.act, self.dtype = scheme, act, dtype
        self.format = storage_format(scheme)
        self.backend = Backend(backend)
        for name, t in empty_buffers(scheme, out_features, in_features, scale_dtype or dtype).items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._w_hat: torch.Tensor | None = None  # dequantized weight cache (torch path only)
        self._kernel_args: tuple | None = None  # per-layer tensors the Triton path derives once

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, act: ActScheme | None, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> "QuantLinear":
        """Build a layer holding ``qw`` (and a float ``bias [out]``); its scales keep ``qw``'s scale dtype."""
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.scheme, act, dtype, bias is not None, scale_dtype=qw.precision.scale_dtype)
        layer.set_quantized(qw)
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer

    def _stored(self) -> dict[str, torch.Tensor]:
        return {name: b for name, b in self.named_buffers(recurse=False)}

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Store ``qw``'s codes and scales in this layer's buffers."""
        stored = self._stored()
        for name, t in to_buffers(qw).items():
            stored[name].copy_(t)
        self._w_hat = self._kernel_args = None

    def quantized_weight(self) -> QuantizedWeight:
        """Decode the buffers back to a QuantizedWeight."""
        return from_buffers(self._stored(), self.scheme, self.out_features, self.in_features, self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """``W_hat [out, in]`` in the model dtype, decoded once and cached (the torch path trades memory for speed)."""
        if self._w_hat is None:
            self._w_hat = self.quantized_weight().dequantize(self.dtype)
        return self._w_hat

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._w_hat = self._kernel_args = None  # new codes invalidate the caches
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """``.to()``, ``.cuda()``, ``.half()``...: the bias follows a dtype change like a float layer's, and so do
        float scales when the new dtype is 16-bit (a 16-bit model stores its scales in its own dtype,
        formats/precision.py); codes, FP8/E8M0/INT8 scales, float32 global/channel scales and the float scales
        of a float32 model only change device (casting them would corrupt the stored weight or widen it)."""
        self._w_hat = self._kernel_args = None  # rebuilt on the new device / dtype
        order = list(self._buffers)
        probe = fn(torch.empty(0, dtype=self.dtype, device=next(iter(self._buffers.values())).device))
        follow = self.format in FLOAT_SCALES and torch.finfo(probe.dtype).bits == 16
        kept = {n: b for n, b in self._buffers.items() if b is not None and not (n == "weight_scale" and follow)}
        for n in kept:
            del self._buffers[n]
        try:
            module = super()._apply(fn, *args, **kwargs)
        finally:
            for n, b in kept.items():
                self._buffers[n] = b.to(probe.device)
            self._buffers = {n: self._buffers[n] for n in order}  # state_dict order unchanged
        self.dtype = probe.dtype
        return module

    def set_input_transform(self, name: str, transform: OnlineHadamard) -> None:
        """Rotate every input with ``transform`` (child ``name``, ``<group>_input``) before quantizing it."""
        self.add_module(name, transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` in the model dtype -> ``[..., out]``; an online input transform runs first."""
        t = input_transform(self)
        if t is not None:
            x = t(x)
        if resolve_backend(self.backend, x.device.type) is Backend.TRITON:
            y = self._triton_forward(x.reshape(-1, self.in_features), insist=self.backend is Backend.TRITON)
            if y is not None:
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.act is not None:
            x = fake_quantize_activation(x, self.act)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def kernel_args(self) -> tuple:
        """The Triton kernel's name and this layer's arguments for it (kernels/triton_gemms.py), derived once per
        device and dtype; ``()`` when no kernel covers the layer's format and activations."""
        from lowbit.kernels import triton_gemms

        if self._kernel_args is None:
            self._kernel_args = triton_gemms.prepare(self.scheme, self.act, self.format, self.in_features, self._stored())
        return self._kernel_args

    def _triton_forward(self, x: torch.Tensor, insist: bool) -> torch.Tensor | None:
        """The Triton GEMM for this layer's format on ``x [M, K]``, or None where no kernel covers it (or,
        unless ``insist``, where the kernel was measured slower than the fp16 matmul at this M)."""
        from lowbit.kernels import triton_gemms

        if not x.is_contiguous():
            x = x.contiguous()
        args = self.kernel_args()
        if args == () or not (insist or triton_gemms.wins(args[0], x.shape[0])):
            return None
        return triton_gemms.run(x, args)

    def extra_repr(self) -> str:
        a = "none" if self.act is None else f"{self.act.format}{self.act.bits}/{self.act.strategy}"
        return f"in={self.in_features}, out={self.out_features}, w={self.scheme.name}, format={self.format}, a={a}"
