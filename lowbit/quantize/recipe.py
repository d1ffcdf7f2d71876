"""Recipes: frozen, validated descriptions of what to quantize and how, with a JSON/YAML round trip.

A recipe names a weight scheme, an optional activation scheme and a rounding method; presets are
looked up by name (``quantize recipes`` lists them). Unknown names and keys are errors that list the
valid ones (DESIGN.md principle 3).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.quantize.rounding import ROUNDERS


@dataclass(frozen=True)
class Recipe:
    """What the pipeline does to a model.

    Attributes:
        name: preset name or a user's label.
        description: one line shown by ``quantize recipes``.
        weights: scheme of every quantized linear weight.
        activations: dynamic activation scheme of every quantized linear, or None (weight-only).
        method: rounding method, a key of ``lowbit.quantize.rounding.ROUNDERS``.
        ignore: linears kept in float, by module path suffix or ``re:`` regex (the embeddings are never
            quantized: they are not linears).
    """

    name: str
    description: str = ""
    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActScheme | None = None
    method: str = "rtn"
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.method not in ROUNDERS:
            raise LowbitError(f"unknown rounding method {self.method!r}; valid: {', '.join(sorted(ROUNDERS))}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the inverse of :func:`recipe_from_dict`)."""
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        return d


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "w4a16",
            "INT4 weights, symmetric, group 128 (per-layer fallback to a dividing power-of-two group), float activations",
            WeightScheme(bits=4, strategy="group", group_size=128, symmetric=True),
        ),
        Recipe(
            "w8a8",
            "INT8 per-channel symmetric weights, INT8 dynamic per-token symmetric activations",
            WeightScheme(bits=8, strategy="channel", group_size=None, symmetric=True),
            ActScheme(),
        ),
        Recipe(
            "w4a8",
            "INT4 group-128 symmetric weights (as w4a16), INT8 dynamic per-token activations",
            WeightScheme(bits=4, strategy="group", group_size=128, symmetric=True),
            ActScheme(),
        ),
    )
}


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct frozen dataclass ``cls`` from a dict, rejecting unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        raise LowbitError(f"{where} must be a mapping, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise LowbitError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(valid)}")
    try:
        return cls(**data)
    except TypeError as e:  # wrong value types surface here
        raise LowbitError(f"invalid {where}: {e}") from None


def recipe_from_dict(data: Any) -> Recipe:
    """Build a Recipe from a dict (as read from JSON/YAML). Nested schemes are dicts; ``activations`` may be null."""
    if not isinstance(data, dict):
        raise LowbitError(f"a recipe must be a mapping, got {type(data).__name__}")
    d = dict(data)
    if "weights" in d:
        d["weights"] = _build(WeightScheme, d["weights"], "recipe.weights")
    if d.get("activations") is not None:
        d["activations"] = _build(ActScheme, d["activations"], "recipe.activations")
    if "ignore" in d:
        if not isinstance(d["ignore"], (list, tuple)) or not all(isinstance(x, str) for x in d["ignore"]):
            raise LowbitError("recipe.ignore must be a list of strings")
        d["ignore"] = tuple(d["ignore"])
    if "name" not in d:
        raise LowbitError("a recipe needs a 'name'")
    return _build(Recipe, d, "recipe")


def load_recipe(name_or_path: str) -> Recipe:
    """A preset by name, or a recipe file (.json, .yaml, .yml)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise LowbitError(f"recipe file {path} does not exist")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise LowbitError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from None
        return recipe_from_dict(data)
    raise LowbitError(
        f"unknown recipe {name_or_path!r}; presets: {', '.join(PRESETS)} (or a .json/.yaml recipe file)"
    )


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write ``recipe`` to ``path`` as JSON or YAML (by suffix)."""
    d = recipe.to_dict()
    text = json.dumps(d, indent=2) if path.suffix.lower() == ".json" else yaml.safe_dump(d, sort_keys=False)
    path.write_text(text)
