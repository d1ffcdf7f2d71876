"""The transform stage: equivalent rotations and scalings applied before rounding (docs/RECIPES.md).

``TRANSFORMS`` is the complete registry (every transform module is imported here); recipes list transforms as
``TransformSpec`` records (transforms/spec.py) and the pipeline applies them through transforms/apply.py.
"""

from __future__ import annotations

from lowbit.quantize.transforms import rotations, smoothquant  # noqa: F401  (imported for their registration)
from lowbit.quantize.transforms.base import BLOCK, MODEL, TRANSFORMS, Transform

__all__ = ["TRANSFORMS", "Transform", "MODEL", "BLOCK"]
