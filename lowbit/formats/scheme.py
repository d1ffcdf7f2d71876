"""Quantization schemes: *what* grid a tensor is rounded to, independent of *how* (RTN, GPTQ...).

A rounding method is a function of (W, statistics, WeightScheme) and returns a QuantizedWeight
(DESIGN.md principle 2). Schemes are frozen dataclasses so they can sit inside frozen recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowbit.errors import LowbitError

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
STRATEGIES = ("tensor", "channel", "group")
FORMATS = ("int", "float")
# Element formats of formats/fp.py by width: the "float" weight format names one of them in ``fp``.
FP_ELEMENTS = {"e4m3": 8, "e5m2": 8, "e3m2": 6, "e2m3": 6, "e2m1": 4}
# How the (group) scales are stored, see WeightScheme.scale_format.
SCALE_FORMATS = ("float", "e8m0", "e4m3", "dual")
# Power-of-two group sizes that real kernels (Marlin, Machete, our Triton W4A16) accept.
MIN_FALLBACK_GROUP = 32


class SignedRange:
    """The signed code range of a ``bits``-wide integer grid (weights and activations alike)."""

    bits: int

    @property
    def qmin(self) -> int:
        """Smallest signed code, -2^(bits-1)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed code, 2^(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class WeightScheme(SignedRange):
    """How a weight matrix ``W [out, in]`` is quantized.

    Attributes:
        format: "int" (integer codes, formats/int.py) or "float" (a small float grid, formats/fp.py).
        bits: bits per code (2-8 for "int"; the element's width for "float").
        strategy: "tensor" (one scale), "channel" (one scale per output row) or "group"
            (one scale per ``group_size`` consecutive input columns of each row).
        group_size: columns per group when strategy == "group".
        symmetric: signed grid with no zero point, else an asymmetric grid with an integer zero point
            ("int" only).
        fp: the element format of a "float" scheme: "e4m3", "e5m2" (FP8), "e3m2", "e2m3" (FP6), "e2m1" (FP4).
        scale_format: how the scales are stored (docs/FORMAT.md):
            "float": in the model dtype (INT, FP8, FP6);
            "e8m0": power-of-two E8M0 group scales (MXFP4, group 32);
            "e4m3": FP8 E4M3 group scales times one float32 per-tensor scale (NVFP4 with group 16;
                FireQ's INT4 with a power-of-two tensor scale);
            "dual": DGQ's dual-grained scales, integer INT8 group multipliers times a float32
                per-channel scale (INT4 only; the group grid is narrowed so ``(q - z) m`` fits INT8).
    """

    format: str = "int"
    bits: int = 4
    strategy: str = "group"
    group_size: int | None = 128
    symmetric: bool = True
    fp: str | None = None
    scale_format: str = "float"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LowbitError(f"unknown weight format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.scale_format not in SCALE_FORMATS:
            raise LowbitError(f"unknown scale format {self.scale_format!r}; valid: {', '.join(SCALE_FORMATS)}")
        if self.format == "int":
            if self.bits not in INT_BITS:
                raise LowbitError(f"int weights take bits in {INT_BITS}, got {self.bits}")
            if self.fp is not None:
                raise LowbitError("an int scheme has no fp element format")
            if self.scale_format == "e8m0":
                raise LowbitError("E8M0 scales are for FP4 (MXFP4) weights")
            if self.scale_format == "e4m3" and not self.symmetric:
                raise LowbitError("E4M3 group scales (FireQ) need a symmetric int grid")
            if self.scale_format == "e4m3" and self.bits != 4:
                raise LowbitError("E4M3 group scales on int weights (FireQ) are for 4-bit weights")
            if self.scale_format == "dual" and (self.bits != 4 or self.symmetric):
                raise LowbitError("dual-grained scales (DGQ) are for asymmetric 4-bit weights")
        else:
            if self.fp not in FP_ELEMENTS:
                raise LowbitError(f"a float scheme needs fp in {', '.join(FP_ELEMENTS)}, got {self.fp!r}")
            if FP_ELEMENTS[self.fp] != self.bits:
                raise LowbitError(f"fp element {self.fp} has {FP_ELEMENTS[self.fp]} bits, not {self.bits}")
            if not self.symmetric:
                raise LowbitError("float grids are symmetric (no zero point)")
            if self.scale_format == "dual":
                raise LowbitError("dual-grained scales are for int4 weights")
            # The grids a storage format exists for (formats/storage.py, docs/FORMAT.md).
            if self.bits in (6, 8) and self.scale_format != "float":
                raise LowbitError(f"FP{self.bits} weights take float scales, not {self.scale_format}")
            if self.bits == 4 and self.scale_format == "float":
                raise LowbitError("FP4 weights take block scales: e4m3 (NVFP4, group 16) or e8m0 (MXFP4, group 32)")
            block = {"e4m3": 16, "e8m0": 32}.get(self.scale_format)
            if block is not None and self.strategy == "group" and self.group_size != block:
                raise LowbitError(f"{self.scale_format} block scales use groups of {block}, got {self.group_size}")
        if self.strategy not in STRATEGIES:
            raise LowbitError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.strategy == "group":
            if self.group_size is None or self.group_size <= 0:
                raise LowbitError("strategy 'group' needs a positive group_size")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")

    @property
    def is_plain_int(self) -> bool:
        """An integer grid with float scales: the grid of formats/int.py that every int path understands."""
        return self.format == "int" and self.scale_format == "float"

    @property
    def name(self) -> str:
        """Short human name, e.g. ``int4 g64 sym``, ``fp4-e2m1 g16 e4m3-scales``."""
        elem = f"int{self.bits}" if self.format == "int" else f"fp{self.bits}-{self.fp}"
        shape = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        extra = "" if self.scale_format == "float" else f" {self.scale_format}-scales"
        sym = "" if self.format == "float" else (" sym" if self.symmetric else " asym")
        return f"{elem} {shape}{sym}{extra}"

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
        return replace(self, group_size=g)

    def for_layer(self, in_features: int) -> "WeightScheme":
        """The scheme actually applied to a layer: the group fallback made explicit (channel or a smaller group)."""
        if self.strategy != "group":
            return self
        g = self.columns_per_scale(in_features)
        if g == self.group_size:
            return self
        if g == in_features:
            return replace(self, strategy="channel", group_size=None)
        return replace(self, group_size=g)

    def per_row(self) -> "WeightScheme":
        """This grid with one scale per output row (what one group of columns is, seen on its own)."""
        return replace(self, strategy="channel", group_size=None)


ACT_INT_BITS = (4, 8)
ACT_STRATEGIES = ("token", "group")


@dataclass(frozen=True)
class ActScheme(SignedRange):
    """How the input activations of a linear are quantized at run time (dynamic: the scales are computed from
    each input as it comes; formats/int.py ``quantize_activation``).

    Attributes:
        format: "int" (INT4/INT8 codes) or "float" (FP8 E4M3).
        bits: bits per code: 4 or 8 for "int", 8 for "float".
        strategy: "token" (one scale per row, i.e. per token) or "group" (one scale per ``group_size``
            consecutive channels of each token; "int" only).
        symmetric: signed grid with no zero point, else an asymmetric grid with an integer zero point ("int" only).
        group_size: channels per scale, required (positive) iff strategy == "group"; it must divide the last
            dimension of the inputs (see :meth:`check_features`).
        clip_ratio: in (0, 1]: the absmax (symmetric) or the min and max (asymmetric) are multiplied by it before
            the scale is computed; values beyond clamp to the grid's ends ("int" only; "float" takes 1.0).

    The new fields follow the original four, so positional construction keeps its meaning; the defaults are
    INT8 symmetric per token, no clipping.
    """

    format: str = "int"
    bits: int = 8
    strategy: str = "token"
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LowbitError(f"unknown activation format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.format == "int":
            if self.bits not in ACT_INT_BITS or isinstance(self.bits, bool):
                raise LowbitError(f"int activations take bits in {ACT_INT_BITS}, got {self.bits!r}")
        elif self.bits != 8 or isinstance(self.bits, bool):
            raise LowbitError(f"float activations are FP8 (e4m3): bits must be 8, got {self.bits!r}")
        if self.strategy not in ACT_STRATEGIES:
            raise LowbitError(f"unknown activation strategy {self.strategy!r}; valid: {', '.join(ACT_STRATEGIES)}")
        if self.strategy == "group":
            g = self.group_size
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
                raise LowbitError(f"activation strategy 'group' needs a positive int group_size (e.g. 32, 64, 128), got {g!r}")
        elif self.group_size is not None:
            raise LowbitError(f"activation group_size is only meaningful with strategy 'group', not {self.strategy!r}")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"activation symmetric must be True or False, got {self.symmetric!r}")
        r = self.clip_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise LowbitError(f"activation clip_ratio must be a number in (0, 1], got {r!r}")
        if self.format == "float" and (self.strategy != "token" or not self.symmetric or r != 1.0):
            raise LowbitError("float (FP8 e4m3) activations are symmetric per token with clip_ratio 1.0 only")

    @property
    def name(self) -> str:
        """Short human name, e.g. ``int8 token sym``, ``int4 g64 asym clip0.9``, ``fp8-e4m3 token``."""
        elem = f"int{self.bits}" if self.format == "int" else "fp8-e4m3"
        shape = f"g{self.group_size}" if self.strategy == "group" else "token"
        sym = "" if self.format == "float" else (" sym" if self.symmetric else " asym")
        clip = "" if self.clip_ratio == 1.0 else f" clip{self.clip_ratio:g}"
        return f"{elem} {shape}{sym}{clip}"

    def check_features(self, in_features: int, where: str) -> None:
        """Raise a one-line LowbitError when the group size does not divide ``in_features`` (the inputs' last
        dimension); ``where`` names the layer or tensor in the message."""
        if self.strategy == "group" and (in_features <= 0 or in_features % self.group_size):
            raise LowbitError(f"{where}: activation group size {self.group_size} does not divide its "
                              f"{in_features} input features ({self.name})")


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
