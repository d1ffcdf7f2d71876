"""quantization_config: build -> parse round trip, target matching, version check."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import (
    FORMAT_VERSION,
    LayerScheme,
    build_quantization_config,
    parse_quantization_config,
    scheme_for,
)
from lowbit.formats.scheme import ActScheme, WeightScheme

G128 = LayerScheme(WeightScheme(bits=4, strategy="group", group_size=128), None, "pack-quantized")
G64 = LayerScheme(WeightScheme(bits=4, strategy="group", group_size=64), None, "pack-quantized")
W8A8 = LayerScheme(WeightScheme(bits=8, strategy="channel", group_size=None), ActScheme(), "int-quantized")


def test_round_trip_groups_layers_by_scheme() -> None:
    layers = {"a.q": G64, "a.down": G128, "b.q": G64}
    qc = build_quantization_config(layers, ["lm_head"], {"recipe": {"name": "w4a16"}})
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["lowbit"]["format_version"] == FORMAT_VERSION
    assert len(qc["config_groups"]) == 2
    groups, ignore = parse_quantization_config(qc)
    assert ignore == ["lm_head"]
    for name, ls in layers.items():
        assert scheme_for(name, "Linear", groups, ignore) == ls
    assert scheme_for("lm_head", "Linear", groups, ignore) is None
    assert scheme_for("c.q", "Linear", groups, ignore) is None


def test_mixed_formats_and_activations() -> None:
    qc = build_quantization_config({"x": G128, "y": W8A8}, [], {})
    assert qc["format"] == "mixed-precision"
    groups, _ = parse_quantization_config(qc)
    assert scheme_for("y", "Linear", groups, []) == W8A8
    args = next(g for g in qc["config_groups"].values() if g["targets"] == ["y"])["input_activations"]
    assert args == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def test_class_and_regex_targets() -> None:
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel", "symmetric": True}}},
          "ignore": ["re:.*lm_head"]}
    groups, ignore = parse_quantization_config(qc)
    assert scheme_for("model.layers.0.mlp.up_proj", "Linear", groups, ignore) is not None
    assert scheme_for("lm_head", "Linear", groups, ignore) is None


def test_newer_version_is_refused() -> None:
    qc = build_quantization_config({"x": G128}, [], {})
    qc["lowbit"]["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(LowbitError, match="newer"):
        parse_quantization_config(qc)


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "gptq"},
        {"quant_method": "compressed-tensors", "config_groups": {}},
        {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"]}}},
        {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",  # int args, FP4 storage
         "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}}},
        {"quant_method": "compressed-tensors", "format": "fp5-packed",
         "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}}},
    ],
)
def test_malformed_configs_are_clear_errors(qc: dict) -> None:
    with pytest.raises(LowbitError):
        parse_quantization_config(qc)
