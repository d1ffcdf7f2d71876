"""The transform stage: equivalent rotations and scalings applied before rounding (docs/RECIPES.md).

``TRANSFORMS`` is the complete registry (every transform module is imported here); recipes list transforms as
``TransformSpec`` records (transforms/spec.py) and the pipeline applies them through transforms/apply.py.
"""

from __future__ import annotations

# imported for their registration, in the order `quantize recipes` lists them
from lowbit.quantize.transforms import rotations, smoothquant  # noqa: F401, I001
from lowbit.quantize.transforms import ost_train, affine  # noqa: F401, I001
from lowbit.quantize.transforms.base import BLOCK, BLOCK_TRAINED, MODEL, TRAINED, TRANSFORMS, Transform

__all__ = ["TRANSFORMS", "Transform", "MODEL", "BLOCK", "TRAINED", "BLOCK_TRAINED"]
