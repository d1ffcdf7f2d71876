"""Block-scaled FP4 (MXFP4, NVFP4), row-scaled FP6/FP8 weights, and the packed layouts of FP4 and FP6 codes.

All functions take a weight ``W [out, in]`` whose blocks run along ``in`` (the GEMM reduction axis) and
return uint8 element codes ``[out, in]`` (bit patterns, see formats/fp.py) plus their scales:

* MXFP4 (OCP MX v1.0): blocks of 32, one E8M0 scale per block, ``2^(floor(log2 amax) - 2)`` (2 = the
  largest exponent of E2M1; the "FLOOR" rule of the spec and of torchao), elements ``fp4(x / 2^e)``
  saturating at +-6. A block of zeros gets the smallest scale, 2^-127.
* NVFP4: blocks of 16, one FP8 E4M3 scale per block and one float32 global scale per tensor:
  ``g = amax(W) / (448 * 6)``, ``s_b = e4m3((amax_b / 6) / g)`` clamped to the smallest positive E4M3
  subnormal, elements ``fp4(x / (g * s_b))``; ``x ~= g * s_b * value``.
* Row-scaled FP6/FP8 (FP6-LLM, FP8 per channel): ``s_o = absmax_o / max`` in the scale dtype, elements
  ``fp(x / s_o)``.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.fp import E2M1, E4M3, FPFormat, decode_e8m0, decode_fp, e8m0_exponent, encode_fp, round_to_fp

MX_BLOCK = 32
NV_BLOCK = 16
E2M1_EMAX = 2  # floor(log2(6))
E4M3_TINY = 2.0**-9  # smallest positive E4M3 subnormal


def _blocks(W: torch.Tensor, block: int) -> torch.Tensor:
    out_f, in_f = W.shape
    if in_f % block:
        raise LowbitError(f"in_features {in_f} is not a multiple of the {block}-element block")
    return W.float().reshape(out_f, in_f // block, block)  # [out, in/block, block]


def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """The MX (E8M0) block scale ``2^(floor(log2 amax) - 2)`` of block maxima ``amax`` (float32, any shape);
    2^-127 for an all-zero block. The one place the "FLOOR" rule is written (formats/grid.py uses it too)."""
    _, E = torch.frexp(amax)
    e = torch.where(amax > 0, E - 1 - E2M1_EMAX, torch.full_like(E, -127)).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(amax), e)


def quantize_mxfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 codes uint8 ``[out, in]`` and E8M0 scale codes uint8 ``[out, in/32]`` of ``W [out, in]``."""
    Wb = _blocks(W, MX_BLOCK)
    scale = mx_scale(Wb.abs().amax(dim=-1))  # [out, B]
    codes = encode_fp(Wb / scale[..., None], E2M1)
    return codes.reshape(W.shape), e8m0_exponent(scale)


def dequantize_mxfp4(codes: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` from MXFP4 codes ``[out, in]`` and E8M0 scale codes ``[out, in/32]``."""
    values = decode_fp(codes, E2M1).reshape(codes.shape[0], -1, MX_BLOCK)
    return (values * decode_e8m0(scale_codes)[..., None]).reshape(codes.shape)


def quantize_nvfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: FP4 codes uint8 ``[out, in]``, E4M3 block scale codes uint8 ``[out, in/16]``, float32 global scale ``[]``."""
    Wb = _blocks(W, NV_BLOCK)
    amax = Wb.abs().amax()
    g = (amax / (E4M3.max * E2M1.max)).clamp_min(torch.finfo(torch.float32).tiny)
    s_b = round_to_fp((Wb.abs().amax(dim=-1) / E2M1.max) / g, E4M3).clamp_min(E4M3_TINY)  # [out, B]
    codes = encode_fp(Wb / (g * s_b)[..., None], E2M1)
    return codes.reshape(W.shape), encode_fp(s_b, E4M3), g.reshape(())


def dequantize_nvfp4(codes: torch.Tensor, scale_codes: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` from NVFP4 codes, E4M3 block scale codes ``[out, in/16]`` and the global scale."""
    values = decode_fp(codes, E2M1).reshape(codes.shape[0], -1, NV_BLOCK)
    return (values * (global_scale.float() * decode_fp(scale_codes, E4M3))[..., None]).reshape(codes.shape)


def quantize_fp_rows(W: torch.Tensor, fmt: FPFormat, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP codes uint8 ``[out, in]`` and float32 scales ``[out, 1]`` (exact in ``scale_dtype``)."""
    Wf = W.float()
    s = (Wf.abs().amax(dim=1, keepdim=True) / fmt.max).to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale gives zero codes
    return encode_fp(Wf / s, fmt), s


# ---- packing ------------------------------------------------------------------------------------------

def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim, the even element in the low nibble: uint8 ``[..., n/2]``."""
    if codes.shape[-1] % 2:
        raise LowbitError(f"FP4 packing needs an even number of elements, got {codes.shape[-1]}")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., n/2]`` -> uint8 codes ``[..., n]``."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)


def pack_fp6(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP6 codes uint8 ``[..., n]`` (n a multiple of 4) split 4+2 as in FP6-LLM.

    Returns:
        hi2: uint8 ``[..., n/4]``: the top 2 bits of each code (sign and exponent MSB), four per byte,
            element ``4k + j`` in bits ``2j..2j+1``.
        lo4: uint8 ``[..., n/2]``: the low 4 bits, two per byte, the even element in the low nibble.
    Both planes are dense, so a kernel reads whole aligned words of either (16 or 8 codes per int32).
    """
    if codes.shape[-1] % 4:
        raise LowbitError(f"FP6 packing needs a multiple of 4 elements, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    top = (c >> 4) & 0x3
    hi2 = top[..., 0::4] | (top[..., 1::4] << 2) | (top[..., 2::4] << 4) | (top[..., 3::4] << 6)
    return hi2, pack_fp4(c & 0xF)


def unpack_fp6(hi2: torch.Tensor, lo4: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp6`: uint8 codes ``[..., n]``."""
    top = torch.stack([(hi2 >> (2 * j)) & 0x3 for j in range(4)], dim=-1).reshape(*hi2.shape[:-1], -1)
    return (top << 4) | unpack_fp4(lo4)
