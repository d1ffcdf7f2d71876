"""The transform registry: a dict filled by a decorator, like the rounding methods' (DESIGN.md principle 4).

A model-level transform is ``fn(model, table, geometry, **options) -> None``: it edits the loaded float model in
place (fusing into weights, adding online modules) and must leave its outputs unchanged up to rounding. A
block-level transform is ``fn(block, table, geometry, **options) -> StageHook``: the staged runner calls the hook
with each norm output before it is consumed (calibrate/staged.py), and the hook folds what it measures into the
block. Import the full registry from ``lowbit.quantize.transforms``, which imports every transform module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

MODEL, BLOCK = "model", "block"


@dataclass(frozen=True)
class Transform:
    """A registry entry.

    Attributes:
        name: the key a recipe uses.
        level: MODEL or BLOCK (see the module docstring).
        fn: the function that applies it.
        options: the TransformSpec fields it reads, passed to ``fn`` as keyword arguments.
        online: whether it leaves a module that runs at inference (written in ``transform_config``).
        needs: names of transforms that must come before it in a recipe.
        description: one line for ``quantize recipes`` and docs/RECIPES.md.
    """

    name: str
    level: str
    fn: Callable[..., Any]
    options: tuple[str, ...]
    online: bool
    needs: tuple[str, ...]
    description: str


TRANSFORMS: dict[str, Transform] = {}


def register(
    name: str, level: str, options: tuple[str, ...] = (), online: bool = False, needs: tuple[str, ...] = (),
    description: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``fn`` to :data:`TRANSFORMS` under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        TRANSFORMS[name] = Transform(name, level, fn, options, online, needs, description)
        return fn

    return deco
