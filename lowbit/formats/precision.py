"""Precision: the two float dtypes a quantized weight goes through, resolved once per model.

A weight on an integer (or FP8/FP6) grid with float scales is ``w_hat = s (q - z)``. Two roundings decide
its exact value, and every path (RTN, GPTQ's column loop, the clipping search, the packer, ``lowbit.load``
and transformers + compressed-tensors) must make the same two:

* ``scale_dtype``: the scales are rounded to it before any code is chosen, and ``weight_scale`` is stored
  in it (float16 for float32 models: float32 scales would cost 32 / group bits per weight for nothing);
* ``dtype``: the model's dtype; the product ``s (q - z)``, exact in float32, is rounded once to it. This is
  what compressed-tensors computes: it creates ``weight_scale`` in the model's dtype, loads the stored
  scales into it, and dequantizes in that dtype. So a float32 model's weights are the exact products of
  float16 scales, and a bfloat16 model's are the products rounded to bfloat16.

Stored scales must be exact in the model dtype (else compressed-tensors would round them on loading): a
16-bit model stores its scales in its own dtype, a float32 model in any of float16, bfloat16, float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """The model dtype ``dtype`` (dequantized weights are rounded to it) and the scale storage ``scale_dtype``."""

    dtype: torch.dtype = torch.float32
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name, d in (("model dtype", self.dtype), ("scale dtype", self.scale_dtype)):
            if d not in FLOAT_DTYPES:
                raise LowbitError(f"{name} must be float32, float16 or bfloat16, got {d}")
        if self.scale_dtype != self.dtype and self.dtype != torch.float32:
            raise LowbitError(
                f"{str(self.scale_dtype).removeprefix('torch.')} scales on a {str(self.dtype).removeprefix('torch.')} "
                "model: compressed-tensors loads scales in the model's dtype, so they must be exact in it "
                "(use scale_dtype: auto)"
            )

    @classmethod
    def of_model(cls, dtype: torch.dtype) -> "Precision":
        """The default for a model of ``dtype``: its own dtype for 16-bit models, float16 scales for float32."""
        return cls(dtype, dtype if torch.finfo(dtype).bits == 16 else torch.float16)
