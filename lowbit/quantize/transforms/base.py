"""The transform registry: a dict filled by a decorator, like the rounding methods' (DESIGN.md principle 4).

A model-level transform is ``fn(model, table, geometry, scope, **options) -> None``: it edits the loaded float model
in place (fusing into weights, adding online modules) and must leave its outputs unchanged up to rounding; ``scope``
(:class:`Scope`) says which part to edit, so that a model streamed block by block (models/lazy.py) gets the
modules outside its blocks edited once and each block as it is read. A
block-level transform is ``fn(block, table, geometry, **options) -> StageHook``: the staged runner calls the hook
with each norm output before it is consumed (calibrate/staged.py), and the hook folds what it measures into the
block. A trained transform (OSTQuant) is ``fn(model, table, geometry, ctx, **options) -> None``: a model-level
transform that first learns from calibration data, given in a :class:`TrainContext`. A block-trained transform
(AffineQuant) is ``fn(block, table, geometry, inputs, fp_out, ctx, **options) -> dict``: before a block is rounded it
learns from the block's quantized-stream inputs (calibrate/runner.py ``BlockInputs``) and the float block's outputs
on the float stream ``fp_out``, folds what it learned into the block, and returns a report. Import the full registry
from ``lowbit.quantize.transforms``, which imports every transform module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from transformers import PreTrainedTokenizerBase

from lowbit.formats.scheme import ActScheme, WeightScheme

MODEL, BLOCK, TRAINED, BLOCK_TRAINED = "model", "block", "trained", "block-trained"


@dataclass(frozen=True)
class Scope:
    """What a model-level transform edits: the model's modules outside its decoder blocks (embedding, final norm,
    lm_head, the config) when ``head``, and the decoder blocks ``blocks`` (each block's edit depends on that block
    alone)."""

    head: bool
    blocks: tuple[nn.Module, ...]


@dataclass(frozen=True)
class TrainContext:
    """What a trained (data-dependent, model-level) transform gets beyond the model: the run's data and quantizers.

    Attributes:
        texts: the calibration texts (calibrate/sources.py), to cut training windows from.
        tokenizer: the model's tokenizer.
        weights: the recipe's weight scheme (group size resolved for the model); activations, kv_cache: its
            activation and KV-cache schemes or None.
        later: the transforms the recipe lists after this one (a trained transform simulates the online ones).
        device: where to train ("cpu" or "cuda"); seed: the run's seed; progress: show a progress bar.
    """

    texts: list[str]
    tokenizer: PreTrainedTokenizerBase
    weights: WeightScheme
    activations: ActScheme | None
    kv_cache: ActScheme | None
    later: tuple[Any, ...]  # TransformSpecs (spec.py imports this module: no import back)
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Transform:
    """A registry entry.

    Attributes:
        name: the key a recipe uses.
        level: MODEL, BLOCK, TRAINED or BLOCK_TRAINED (see the module docstring).
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


def device_defaults(options: dict[str, Any], device: str, cpu: dict[str, Any], cuda: dict[str, Any]) -> dict[str, Any]:
    """A trained transform's settings: each key of ``cpu``/``cuda`` from ``options`` unless None there, else the
    default of ``device`` ("cpu", "cuda" or "cuda:N")."""
    defaults = cuda if device.startswith("cuda") else cpu
    return {k: defaults[k] if options.get(k) is None else options[k] for k in defaults}
