"""What a quantization run produced: per-layer results and the run's summary.

Their own module so that the pipeline (which makes them), the output writer and the report (which read
them) import in one direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.quantize.recipe import Recipe


@dataclass
class LayerResult:
    """What happened to one linear: the scheme applied, its storage cost and its error."""

    name: str
    shape: tuple[int, int]
    bits: int
    strategy: str
    group_size: int | None
    fallback: str | None
    storage_bits: int  # bits of the layer's tensors in the checkpoint: codes, scales, zero points, shape
    weight_rel_err: float
    output_rel_err: float
    loss: float | None = None
    note: str | None = None
    symmetric: bool = True
    scheme: str = ""  # WeightScheme.name, e.g. "int4 g64 sym", "fp4-e2m1 g16 e4m3-scales"

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        """Checkpoint bits of this layer per weight."""
        return self.storage_bits / self.params


@dataclass
class QuantizeResult:
    """What ``quantize_model`` returns: where the output is and the numbers of the summary.

    ``timings`` (seconds; not written to the report, which stays deterministic): ``load``, ``transform``
    (the model-level transforms and the attention setup), ``allocation``
    (BAQ's sensitivity pass), ``blocks`` (the calibration pass through every block, statistics and
    rounding included), ``rounding`` (the part of ``blocks`` spent in the rounding method) and ``write``.
    """

    out: Path
    recipe: Recipe
    layers: list[LayerResult]
    size_before: int
    size_after: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits (codes, scales, zero points) per parameter of the quantized linears."""
        return sum(l.storage_bits for l in self.layers) / max(sum(l.params for l in self.layers), 1)
