"""The complete registry of rounding methods: import ROUNDERS from here, not from rounding.py.

Each method module registers itself on import (DESIGN.md principle 4: a dict filled by a decorator);
this module imports them all, so whoever reads ROUNDERS through it sees every method.
"""

from __future__ import annotations

from lowbit.quantize import gptq, rtn  # noqa: F401  (imported for their registration)
from lowbit.quantize.rounding import ROUNDERS, RoundingMethod, RoundResult

__all__ = ["ROUNDERS", "RoundingMethod", "RoundResult"]
