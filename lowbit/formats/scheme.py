"""Quantization schemes: *what* grid a tensor is rounded to, independent of *how* (RTN, GPTQ...).

A rounding method is a function of (W, statistics, WeightScheme) and returns a QuantizedWeight
(DESIGN.md principle 2). Schemes are frozen dataclasses so they can sit inside frozen recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
STRATEGIES = ("tensor", "channel", "group")
# Power-of-two group sizes that real kernels (Marlin, Machete, our Triton W4A16) accept.
MIN_FALLBACK_GROUP = 32


@dataclass(frozen=True)
class WeightScheme:
    """How a weight matrix ``W [out, in]`` is quantized.

    Attributes:
        format: number format; "int" for the integer grids of this module.
        bits: bits per code (2-8 for "int").
        strategy: "tensor" (one scale), "channel" (one scale per output row) or "group"
            (one scale per ``group_size`` consecutive input columns of each row).
        group_size: columns per group when strategy == "group".
        symmetric: signed grid with no zero point, else an asymmetric grid with an integer zero point.
    """

    format: str = "int"
    bits: int = 4
    strategy: str = "group"
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.format != "int":
            raise LowbitError(f"unknown weight format {self.format!r}; valid: int")
        if self.bits not in INT_BITS:
            raise LowbitError(f"int weights take bits in {INT_BITS}, got {self.bits}")
        if self.strategy not in STRATEGIES:
            raise LowbitError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.strategy == "group":
            if self.group_size is None or self.group_size <= 0:
                raise LowbitError("strategy 'group' needs a positive group_size")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")

    @property
    def qmin(self) -> int:
        """Smallest signed code, -2^(bits-1)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed code, 2^(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    def columns_per_scale(self, in_features: int) -> int:
        """Columns that share one scale for a layer with ``in_features`` inputs (see resolve_group_size)."""
        if self.strategy == "group":
            return resolve_group_size(in_features, self.group_size or in_features)
        return in_features

    def for_model(self, in_features: list[int]) -> "WeightScheme":
        """This scheme with the group size every layer of a model can share (see model_group_size)."""
        if self.strategy != "group" or not in_features:
            return self
        g = model_group_size(in_features, self.group_size or 0)
        if g is None or g == self.group_size:
            return self
        return WeightScheme(self.format, self.bits, "group", g, self.symmetric)

    def for_layer(self, in_features: int) -> "WeightScheme":
        """The scheme actually applied to a layer: the group fallback made explicit (channel or a smaller group)."""
        if self.strategy != "group":
            return self
        g = self.columns_per_scale(in_features)
        if g == self.group_size:
            return self
        if g == in_features:
            return WeightScheme(self.format, self.bits, "channel", None, self.symmetric)
        return WeightScheme(self.format, self.bits, "group", g, self.symmetric)


@dataclass(frozen=True)
class ActScheme:
    """How the input activations of a linear are quantized at run time.

    Attributes:
        format: "int" (INT8 here).
        bits: bits per code.
        strategy: "token" — one scale per row (token) computed dynamically from that row's absmax.
        symmetric: only symmetric activations are supported.
    """

    format: str = "int"
    bits: int = 8
    strategy: str = "token"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.format != "int" or self.bits != 8:
            raise LowbitError(f"activation quantization supports int 8-bit only, got {self.format} {self.bits}")
        if self.strategy != "token":
            raise LowbitError(f"activation strategy must be 'token' (dynamic per token), got {self.strategy!r}")
        if not self.symmetric:
            raise LowbitError("only symmetric activation quantization is supported")


def model_group_size(in_features: list[int], group_size: int) -> int | None:
    """The group size for a whole model: ``group_size`` if it divides every layer's ``in_features``, else the
    largest power of two ``g >= 32``, ``g <= group_size``, that does; None if there is none (each layer then
    falls back on its own, see resolve_group_size).

    One group size for every layer keeps the checkpoint one scheme (one kernel configuration) and is the
    finer grid: SmolLM2's 576-input layers force 64, so its 1536-input down_proj uses 64 too.
    """
    candidates = [group_size] + [1 << k for k in range(group_size.bit_length() - 1, 4, -1) if (1 << k) < group_size]
    for g in candidates:
        if g >= MIN_FALLBACK_GROUP and all(i % g == 0 for i in in_features):
            return g
    return None


def resolve_group_size(in_features: int, group_size: int) -> int:
    """Columns per scale for a group scheme on a layer with ``in_features`` inputs.

    compressed-tensors (and vLLM's kernels) need the group size to divide ``in_features``. When it does
    not (SmolLM2: 576 with group 128), the documented fallback is the largest power of two
    ``g' >= 32`` with ``g' <= group_size`` that divides ``in_features`` (576 -> 64); if there is none
    (stories260K's 172), one scale per output channel (returns ``in_features``).
    A group size >= in_features also means one scale per channel.
    """
    if group_size >= in_features:
        return in_features
    if in_features % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)  # largest power of two <= group_size
    while g >= MIN_FALLBACK_GROUP:
        if in_features % g == 0:
            return g
        g //= 2
    return in_features
