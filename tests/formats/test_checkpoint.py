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


ACT_SCHEMES = [
    ActScheme(),
    ActScheme(format="float"),
    ActScheme(bits=4),
    ActScheme(bits=4, symmetric=False),
    ActScheme(bits=8, strategy="group", group_size=32),
    ActScheme(bits=4, strategy="group", group_size=64, symmetric=False),
    ActScheme(bits=4, strategy="group", group_size=128, symmetric=False, clip_ratio=0.9),
    ActScheme(bits=8, strategy="group", group_size=96, clip_ratio=0.85),
    ActScheme(bits=4, clip_ratio=0.75),
]


@pytest.mark.parametrize("act", ACT_SCHEMES, ids=lambda a: a.name)
def test_act_args_are_valid_compressed_tensors_args(act: ActScheme) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs

    from lowbit.formats.checkpoint import _act_args

    args = _act_args(act)
    assert "clip_ratio" not in args  # compressed-tensors' args forbid unknown keys
    parsed = QuantizationArgs.model_validate(args)
    def v(e: object) -> object:
        return getattr(e, "value", e)  # enums or, with use_enum_values, their strings

    assert (parsed.num_bits, v(parsed.type), parsed.symmetric, v(parsed.strategy), parsed.dynamic) == (
        act.bits, act.format, act.symmetric, act.strategy, True)
    assert parsed.group_size == act.group_size


def test_every_activation_scheme_round_trips() -> None:
    w4 = WeightScheme(bits=4, strategy="group", group_size=128)
    layers = {f"l{i}": LayerScheme(w4 if a.format == "int" else WeightScheme("float", 8, "channel", None, fp="e4m3"),
                                   a, "pack-quantized" if a.format == "int" else "float-quantized")
              for i, a in enumerate(ACT_SCHEMES)}
    layers["plain"] = G128
    qc = build_quantization_config(layers, [], {})
    clips = qc["lowbit"]["act_clip_ratios"]
    assert sorted(clips.values()) == [0.75, 0.85, 0.9]  # only the clipped groups
    groups, _ = parse_quantization_config(qc)
    for name, ls in layers.items():
        assert scheme_for(name, "Linear", groups, []) == ls
    # no clipping anywhere: no key
    assert "act_clip_ratios" not in build_quantization_config({"y": W8A8}, [], {})["lowbit"]


def test_group_activation_args() -> None:
    ls = LayerScheme(G128.weights, ActScheme(bits=4, strategy="group", group_size=64, symmetric=False), "pack-quantized")
    qc = build_quantization_config({"x": ls}, [], {})
    args = qc["config_groups"]["group_0"]["input_activations"]
    assert args == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64, "dynamic": True}


@pytest.mark.parametrize(
    "act_args, clip",
    [
        ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": True}, None),  # no group_size
        ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}, 1.5),
        (None, 0.9),  # a clip ratio for a group without activations
        ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": True}, None),
    ],
)
def test_bad_activation_configs_are_clear_errors(act_args: dict | None, clip: float | None) -> None:
    qc = build_quantization_config({"x": G128}, [], {})
    qc["config_groups"]["group_0"]["input_activations"] = act_args
    if clip is not None:
        qc["lowbit"]["act_clip_ratios"] = {"group_0": clip}
    with pytest.raises(LowbitError) as e:
        parse_quantization_config(qc)
    assert "\n" not in str(e.value)
