"""Small floating-point element formats: FP8 (E4M3, E5M2), FP6 (E3M2, E2M3), FP4 (E2M1) and the E8M0 scale.

A format ``[s | e..e | m..m]`` with ``ebits`` exponent bits, ``mbits`` mantissa bits and bias ``bias`` holds

* normals ``(-1)^s 2^(E - bias) (1 + M / 2^mbits)`` for exponent fields ``E >= 1``,
* subnormals ``(-1)^s 2^(1 - bias) (M / 2^mbits)`` for ``E = 0``,

up to ``max`` (448 for E4M3, whose all-ones code is NaN; 57344 for E5M2, whose top exponent is inf/NaN;
28, 7.5 and 6 for E3M2, E2M3 and E2M1, which have no inf or NaN at all).

Rounding is round-to-nearest-even onto that grid with saturation at ``+-max`` (also for inf inputs); NaN
stays NaN. Codes are the raw bit patterns in the low bits of a uint8, so FP8 codes are exactly what
``tensor.to(torch.float8_e4m3fn).view(torch.uint8)`` gives for every in-range input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class FPFormat:
    """One element format.

    Attributes:
        name: "e4m3", "e5m2", "e3m2", "e2m3" or "e2m1".
        ebits, mbits: exponent and mantissa widths (sign bit is always present).
        bias: exponent bias.
        max: largest finite magnitude (saturation bound).
        nan_codes: magnitude codes (sign bit cleared) that decode to NaN.
        inf_code: magnitude code of infinity, or None.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    nan_codes: tuple[int, ...] = ()
    inf_code: int | None = None

    @property
    def bits(self) -> int:
        """Bits per code, sign included."""
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (also the scale of the subnormals)."""
        return 1 - self.bias

    @cached_property
    def table(self) -> torch.Tensor:
        """float32 ``[2^bits]``: the value of every code (NaN for the codes that are not numbers)."""
        codes = torch.arange(1 << self.bits)
        sign = torch.where((codes >> (self.ebits + self.mbits)) & 1 == 1, -1.0, 1.0)
        mag = codes & ((1 << (self.ebits + self.mbits)) - 1)
        E = (mag >> self.mbits).double()
        M = (mag & ((1 << self.mbits) - 1)).double()
        frac = M / (1 << self.mbits)
        value = torch.where(E > 0, torch.exp2(E - self.bias) * (1 + frac), 2.0 ** self.emin * frac)
        value = (sign * value).float()
        if self.inf_code is not None:
            value = torch.where(mag == self.inf_code, sign.float() * torch.inf, value)
        if self.nan_codes:
            value = torch.where(torch.isin(mag, torch.tensor(self.nan_codes)), torch.nan, value)
        return value


E4M3 = FPFormat("e4m3", 4, 3, 7, 448.0, nan_codes=(0x7F,))
E5M2 = FPFormat("e5m2", 5, 2, 15, 57344.0, nan_codes=(0x7D, 0x7E, 0x7F), inf_code=0x7C)
E3M2 = FPFormat("e3m2", 3, 2, 3, 28.0)
E2M3 = FPFormat("e2m3", 2, 3, 1, 7.5)
E2M1 = FPFormat("e2m1", 2, 1, 1, 6.0)
FP_FORMATS: dict[str, FPFormat] = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}


def fp_format(name: str) -> FPFormat:
    """The format called ``name`` or a LowbitError listing the valid names."""
    try:
        return FP_FORMATS[name]
    except KeyError:
        raise LowbitError(f"unknown floating-point format {name!r}; valid: {', '.join(FP_FORMATS)}") from None


def round_to_fp(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Round ``x`` (any float dtype, any shape) to the nearest value of ``fmt``, ties to even, saturating.

    Returns float32 of ``x``'s shape; every finite output is exactly representable in ``fmt``.
    """
    x = x.float()
    a = x.abs()
    _, E = torch.frexp(a)  # a = m 2^E with m in [0.5, 1): floor(log2 a) = E - 1 (E = 0 for a = 0)
    e = torch.clamp(E - 1, min=fmt.emin)  # subnormals share the smallest normal's step
    step = torch.ldexp(torch.ones_like(a), e - fmt.mbits)  # spacing of the grid in a's binade
    q = torch.round(a / step) * step  # exact: step is a power of two; torch.round is half-to-even
    q = torch.clamp(q, max=fmt.max)  # saturate (also +inf); NaN propagates
    return torch.copysign(q, x)


def encode_fp(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Codes of ``round_to_fp(x, fmt)``: uint8 of ``x``'s shape, the bit pattern in the low ``fmt.bits`` bits.

    NaN inputs give the format's NaN code where it has one and 0 otherwise (FP6/FP4 have no NaN).
    """
    q = round_to_fp(x, fmt)
    nan = torch.isnan(q)
    q = torch.where(nan, torch.zeros_like(q), q)
    a = q.abs()
    _, E = torch.frexp(a)
    normal = a >= 2.0 ** fmt.emin
    e = torch.where(normal, E - 1, torch.full_like(E, fmt.emin))
    exp_field = torch.where(normal, E - 1 + fmt.bias, torch.zeros_like(E))
    mant = torch.ldexp(a, fmt.mbits - e) - torch.where(normal, 1 << fmt.mbits, 0)
    sign = torch.signbit(q).to(torch.int32) << (fmt.ebits + fmt.mbits)
    codes = sign | (exp_field.to(torch.int32) << fmt.mbits) | mant.to(torch.int32)
    if fmt.nan_codes:
        codes = torch.where(nan, torch.full_like(codes, fmt.nan_codes[-1]), codes)
    return codes.to(torch.uint8)


def decode_fp(codes: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Values of ``codes`` (uint8, bit patterns in the low ``fmt.bits`` bits) as float32 of the same shape."""
    if codes.dtype != torch.uint8:
        raise LowbitError(f"{fmt.name} codes must be uint8, got {codes.dtype}")
    return fmt.table.to(codes.device)[codes.long() & ((1 << fmt.bits) - 1)]


def e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 codes (uint8, ``2^(code - 127)``) of power-of-two ``scale`` values; 255 (NaN) for non-finite."""
    _, E = torch.frexp(scale.float())
    code = torch.clamp(E - 1 + 127, 0, 254)
    return torch.where(torch.isfinite(scale) & (scale > 0), code, torch.full_like(code, 255)).to(torch.uint8)


def decode_e8m0(code: torch.Tensor) -> torch.Tensor:
    """float32 ``2^(code - 127)`` of E8M0 codes (uint8); NaN for 255."""
    v = torch.ldexp(torch.ones(code.shape, dtype=torch.float32, device=code.device), code.long() - 127)
    return torch.where(code == 255, torch.nan, v)


FP8_SCALE_EPS = 1e-12  # smallest per-token FP8 scale (an all-zero row)


def quantize_activation_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 E4M3 of activations ``x [..., K]``: ``s = max(absmax / 448, 1e-12)``,
    ``q = e4m3(x / s)`` (round to nearest even, saturating).

    Returns float8_e4m3fn ``[..., K]`` and float32 scales ``[..., 1]``. The scale divides elementwise (torch on
    CUDA multiplies by the reciprocal of a Python-scalar divisor, which is not IEEE division); torch's cast is
    round-to-nearest-even like :func:`round_to_fp` and the clamp makes it saturate.
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    s = (absmax / torch.full_like(absmax, E4M3.max)).clamp_min(FP8_SCALE_EPS)
    return (xf / s).clamp(-E4M3.max, E4M3.max).to(torch.float8_e4m3fn), s
