"""The complete registry of rounding methods: import ROUNDERS from here, not from rounding.py.

Each method module registers itself on import (DESIGN.md principle 4: a dict filled by a decorator);
this module imports them all, so whoever reads ROUNDERS through it sees every method. A method that is also in
TRAINERS (DiscQuant, LR-QAT) is trained through the model's output after the block loop (quantize/finetune.py).
"""

from __future__ import annotations

from lowbit.quantize import discquant, gptq, lrqat, rtn  # noqa: F401  (imported for their registration)
from lowbit.quantize.finetune import TRAINERS
from lowbit.quantize.rounding import ROUNDERS, RoundingMethod, RoundResult

__all__ = ["ROUNDERS", "TRAINERS", "RoundingMethod", "RoundResult"]
