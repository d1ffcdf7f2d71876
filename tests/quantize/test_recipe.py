"""Recipes: presets, JSON/YAML round trip, and errors that list the valid names and keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.quantize.recipe import PRESETS, BAQOptions, dump_recipe, load_recipe, recipe_from_dict


def test_presets_of_the_walking_skeleton() -> None:
    assert {"w4a16", "w8a8", "w4a8"} <= set(PRESETS)
    assert PRESETS["w4a16"].activations is None
    assert PRESETS["w4a16"].weights.group_size == 128 and PRESETS["w4a16"].weights.symmetric
    assert PRESETS["w8a8"].weights.strategy == "channel" and PRESETS["w8a8"].activations.bits == 8
    assert PRESETS["w4a8"].weights == PRESETS["w4a16"].weights and PRESETS["w4a8"].activations is not None


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_file_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    dump_recipe(PRESETS[name], path)
    assert load_recipe(str(path)) == PRESETS[name]


def test_custom_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: w3-asym\nweights: {bits: 3, strategy: group, group_size: 64, symmetric: false}\nactivations: null\n")
    r = load_recipe(str(path))
    assert r.weights.bits == 3 and not r.weights.symmetric and r.activations is None and r.method == "rtn"


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(LowbitError, match="w4a16"):
        load_recipe("w5a5")


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(LowbitError, match="bogus.*valid: name, description, weights"):
        recipe_from_dict({"name": "x", "bogus": 1})
    with pytest.raises(LowbitError, match="group_sz.*valid: format, bits"):
        recipe_from_dict({"name": "x", "weights": {"group_sz": 64}})


def test_unknown_method_lists_methods() -> None:
    with pytest.raises(LowbitError, match="valid: .*rtn"):
        recipe_from_dict({"name": "x", "method": "awq"})


@pytest.mark.parametrize("text", ["name: [unclosed", "- just\n- a list\n"])
def test_bad_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LowbitError):
        load_recipe(str(path))
    with pytest.raises(LowbitError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.json"))


def test_baq_sensitivity_round_trips_and_is_checked(tmp_path: Path) -> None:
    recipe = load_recipe("baq-3.5")
    assert recipe.baq is not None and recipe.baq.sensitivity == "fisher"
    hessian = dataclasses.replace(recipe, baq=dataclasses.replace(recipe.baq, sensitivity="hessian"))
    path = tmp_path / "r.yaml"
    dump_recipe(hessian, path)
    assert load_recipe(str(path)) == hessian
    with pytest.raises(LowbitError, match="fisher"):
        BAQOptions(sensitivity="gradient")


def test_baq_needs_an_int_grid() -> None:
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="BAQ allocates integer widths"):
        dataclasses.replace(PRESETS["baq-3.5"], weights=PRESETS["w4a16-nvfp4"].weights)
