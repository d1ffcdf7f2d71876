"""Recipes: frozen, validated descriptions of what to quantize and how, with a JSON/YAML round trip.

A recipe names a weight scheme, an optional activation scheme and a rounding method; presets are
looked up by name (``quantize recipes`` lists them). Unknown names and keys are errors that list the
valid ones (DESIGN.md principle 3).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lowbit.errors import LowbitError
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.quantize.methods import ROUNDERS, TRAINERS
from lowbit.quantize.options import BAQOptions, RoundingOptions, TrainingOptions
from lowbit.quantize.transforms.apply import check_recipe
from lowbit.quantize.transforms.spec import TransformSpec


SCALE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Recipe:
    """What the pipeline does to a model.

    Attributes:
        name: preset name or a user's label.
        description: one line shown by ``quantize recipes``.
        weights: scheme of every quantized linear weight.
        activations: dynamic activation scheme of every quantized linear, or None (weight-only).
        method: rounding method, a key of ``lowbit.quantize.rounding.ROUNDERS``.
        rounding: the rounding method's options.
        training: the options of a method trained through the model's output ("disc", "lrqat"; finetune.py).
        baq: bit allocation; when set, each layer's width comes from BAQ and ``weights.bits`` is the
            reference width of its sensitivity measurement.
        scale_dtype: dtype the float scales are stored in; "auto" is the model dtype for 16-bit models and
            float16 for float32 models (float32 scales would cost 32/group bits per weight for no accuracy).
            A 16-bit model takes only its own dtype (formats/precision.py).
        ignore: linears kept in float, by module path suffix or ``re:`` regex (the embeddings are never
            quantized: they are not linears).
        transforms: the transforms applied before rounding, in order (quantize/transforms/, docs/RECIPES.md).
        kv_cache: dynamic quantization of the attention's keys and values (after RoPE, and after R3 when the
            recipe rotates them), or None (float). Its strategy is "token": one scale (and zero point) per token
            and head, a group of head_dim channels; written as compressed-tensors' ``kv_cache_scheme``.
    """

    name: str
    description: str = ""
    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActScheme | None = None
    method: str = "rtn"
    rounding: RoundingOptions = field(default_factory=RoundingOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    baq: BAQOptions | None = None
    scale_dtype: str = "auto"
    ignore: tuple[str, ...] = ("lm_head",)
    transforms: tuple[TransformSpec, ...] = ()
    kv_cache: ActScheme | None = None

    def __post_init__(self) -> None:
        if self.method not in ROUNDERS:
            raise LowbitError(f"unknown rounding method {self.method!r}; valid: {', '.join(sorted(ROUNDERS))}")
        if self.method in TRAINERS and not self.weights.is_plain_int:
            raise LowbitError(f"{self.method} trains integer codes: weights must be an int grid with float scales, not {self.weights.name}")
        if self.method not in TRAINERS and self.training != TrainingOptions():
            raise LowbitError(f"training options apply to {', '.join(sorted(TRAINERS))}, not to method {self.method!r}")
        if self.method == "lrqat" and (not self.weights.symmetric or self.baq is not None):
            raise LowbitError("lrqat needs symmetric int weights (its fixed-point base is signed) and no BAQ")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"unknown scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        if self.baq is not None and not self.weights.is_plain_int:
            raise LowbitError(f"BAQ allocates integer widths: its base weights must be an int grid with float scales, not {self.weights.name}")
        if self.kv_cache is not None and (self.kv_cache.format != "int" or self.kv_cache.strategy != "token"):
            raise LowbitError("kv_cache takes an int scheme with strategy 'token' (one scale per token and head), got "
                              f"{self.kv_cache.format} {self.kv_cache.strategy}")
        check_recipe(self.transforms, self.activations, self.kv_cache)

    def precision(self, model_dtype: torch.dtype) -> Precision:
        """The scale storage and model dtypes for a model of ``model_dtype``, resolved once for the whole run."""
        if self.scale_dtype == "auto":
            return Precision.of_model(model_dtype)
        return Precision(model_dtype, getattr(torch, self.scale_dtype))

    def with_avg_bits(self, avg_bits: float) -> "Recipe":
        """This recipe with another BAQ budget (``--avg-bits``); an error for a recipe without BAQ."""
        if self.baq is None:
            raise LowbitError(f"--avg-bits needs a BAQ recipe; {self.name!r} allocates no bits")
        return dataclasses.replace(self, baq=dataclasses.replace(self.baq, avg_bits=avg_bits))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the inverse of :func:`recipe_from_dict`)."""
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        d["transforms"] = [t.to_dict() for t in self.transforms]
        if self.baq is not None:
            d["baq"]["widths"] = list(self.baq.widths)
            d["baq"]["group_sizes"] = list(self.baq.group_sizes)
        return d


INT4_G128 = WeightScheme(bits=4, strategy="group", group_size=128, symmetric=True)
GPTQ = "gptq"
# The presets' GPTQ: group-aware order with on-the-fly group scales, the MSE clipping search and the scales
# refit after GPTQ, the best of the settings measured on SmolLM2-135M w4a16 (BENCHMARKS.md, 2026-11-23 and
# 2026-11-28); the clipping search coarse-to-fine (every 4th candidate, then the best one's neighbours: 26 of
# 80 evaluations), as good as the full search there and faster (BENCHMARKS.md, 2026-11-28, code of 92d95fb).
GPTQ_BEST = RoundingOptions(order="gar", static_groups=False, mse_clip=True, clip_stride=4, refit_scales=True)

# Rotations fused into the weights: the checkpoint stays a plain compressed-tensors one (ALGORITHMS.md 12.1).
ROT_FUSED = (TransformSpec("fold_norms"), TransformSpec("r1"), TransformSpec("r2"))
# OSTQuant's learned transforms, fused (transforms/ost.py): the norm gains must be folded first.
OST_FUSED = (TransformSpec("fold_norms"), TransformSpec("ost"))
INT4_G64 = WeightScheme(bits=4, strategy="group", group_size=64, symmetric=True)
INT3_G64 = WeightScheme(bits=3, strategy="group", group_size=64, symmetric=True)
INT8_CHANNEL = WeightScheme(bits=8, strategy="channel", group_size=None, symmetric=True)
# QuaRot's W4A4KV4 clipping: 0.9 on the activations, 0.95 on K and V (ALGORITHMS.md 12.1, item 6).
A4_TOKEN = ActScheme(bits=4, symmetric=False, clip_ratio=0.9)
KV4 = ActScheme(bits=4, symmetric=False, clip_ratio=0.95)

PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w4a16", "INT4 symmetric group-128 weights (documented group fallback), GPTQ (group-aware order, MSE clipping, scale refit), float activations",
               INT4_G128, method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w8a8", "INT8 per-channel symmetric weights (RTN), INT8 dynamic per-token symmetric activations",
               WeightScheme(bits=8, strategy="channel", group_size=None, symmetric=True), ActScheme()),
        Recipe("w4a8", "INT4 group-128 symmetric weights (GPTQ, as w4a16), INT8 dynamic per-token activations",
               INT4_G128, ActScheme(), method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w3a16", "INT3 symmetric group-128 weights, GPTQ (group-aware order, MSE clipping, scale refit)",
               WeightScheme(bits=3, strategy="group", group_size=128), method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w4a16-actorder", "INT4 symmetric group-128 weights, GPTQ act-order + static groups (the reference setting)",
               INT4_G128, method=GPTQ),
        Recipe("w2a16", "INT2 asymmetric group-64 weights, GPTQ (group-aware order, MSE clipping, scale refit)",
               WeightScheme(bits=2, strategy="group", group_size=64, symmetric=False), method=GPTQ, rounding=GPTQ_BEST),
        # Widths 5 and 6 and group 32 as well as {2,3,4,8} x {model's group, 128}: SmolLM2's v_proj layers take
        # them, and the model is better for it (BENCHMARKS.md, 2026-11-28, code of d6d3c68).
        Recipe("baq-3.5", "BAQ: per-layer INT2/3/4/5/6/8, group 32, 128 or the model's, symmetric or asymmetric, at 3.5 "
               "average bits (scales and zero points counted), GPTQ rounding",
               INT4_G128, method=GPTQ, rounding=GPTQ_BEST,
               baq=BAQOptions(avg_bits=3.5, widths=(2, 3, 4, 5, 6, 8), group_sizes=(32, 128), asymmetric=True)),
        Recipe("w4a16-rtn", "INT4 symmetric group-128 weights by round-to-nearest (the baseline GPTQ improves on)",
               INT4_G128),
        Recipe("w4a16-nvfp4", "NVFP4 weights: FP4 E2M1, blocks of 16 with E4M3 scales and one FP32 global scale, GPTQ; "
               "float activations", WeightScheme("float", 4, "group", 16, fp="e2m1", scale_format="e4m3"),
               method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w4a16-mxfp4", "MXFP4 weights: FP4 E2M1, blocks of 32 with power-of-two E8M0 scales, GPTQ; float activations",
               WeightScheme("float", 4, "group", 32, fp="e2m1", scale_format="e8m0"), method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w6a16-fp6", "FP6 E3M2 weights with one scale per output channel (FP6-LLM), GPTQ; float activations",
               WeightScheme("float", 6, "channel", None, fp="e3m2"), method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w8a8-fp8", "FP8 E4M3 per-channel weights (RTN), FP8 E4M3 dynamic per-token activations",
               WeightScheme("float", 8, "channel", None, fp="e4m3"), ActScheme(format="float")),
        Recipe("w4a8-dgq", "DGQ A8W4: INT4 asymmetric group-128 weights with INT8 group multipliers and a per-channel "
               "scale (dual-grained), GPTQ; INT8 dynamic per-token activations",
               WeightScheme("int", 4, "group", 128, symmetric=False, scale_format="dual"), ActScheme(),
               method=GPTQ, rounding=GPTQ_BEST),
        Recipe("w4a16-rot", "R1 + R2 Hadamard rotations fused into the weights (norm gains folded, lm_head untied), "
               "then w4a16: INT4 symmetric group-128 weights, GPTQ; a plain compressed-tensors checkpoint",
               INT4_G128, method=GPTQ, rounding=GPTQ_BEST, transforms=ROT_FUSED),
        Recipe("w4a16-rot4", "w4a16-rot plus R4 online (Hadamard on the down_proj input, its transpose fused into "
               "down_proj): better weights, but the checkpoint needs lowbit or vLLM", INT4_G128, method=GPTQ,
               rounding=GPTQ_BEST, transforms=ROT_FUSED + (TransformSpec("r4"),)),
        Recipe("w4a8-rot", "R1 + R2 fused and R4 online (Hadamard on the down_proj input), INT4 group-128 weights (GPTQ), "
               "INT8 dynamic per-token activations", INT4_G128, ActScheme(), method=GPTQ, rounding=GPTQ_BEST,
               transforms=ROT_FUSED + (TransformSpec("r4"),)),
        Recipe("w8a8-smooth", "SmoothQuant (alpha 0.5: into the norm gains, v into o, up into down), INT8 per-channel weights by GPTQ, "
               "INT8 dynamic per-token activations", INT8_CHANNEL, ActScheme(), method=GPTQ, rounding=GPTQ_BEST,
               transforms=(TransformSpec("smoothquant", alpha=0.5),)),
        Recipe("w4a4kv4-rot", "R1 + R2 fused, R3 (Q/K after RoPE) and R4 online; INT4 group-128 weights (GPTQ), INT4 "
               "dynamic per-token asymmetric activations clipped at 0.9, INT4 asymmetric KV cache per head clipped at 0.95",
               INT4_G128, A4_TOKEN, method=GPTQ, rounding=GPTQ_BEST, kv_cache=KV4,
               transforms=ROT_FUSED + (TransformSpec("r3"), TransformSpec("r4"))),
        Recipe("w4a4kv4", "w4a4kv4-rot without the rotations (the baseline they improve on)",
               INT4_G128, A4_TOKEN, method=GPTQ, rounding=GPTQ_BEST, kv_cache=KV4),
        Recipe("w4a16-ost", "OSTQuant: R1, per-KV-head R2 and diagonal scalings learned with KL-Top through INT4 weight "
               "fake-quant (straight-through), fused into the weights; then w4a16 (GPTQ); a plain compressed-tensors "
               "checkpoint", INT4_G128, method=GPTQ, rounding=GPTQ_BEST, transforms=OST_FUSED),
        Recipe("w4a8-ost", "OSTQuant's learned transforms (trained through INT4 weights and INT8 activations) fused, R4 "
               "online; INT4 group-128 weights (GPTQ), INT8 dynamic per-token activations", INT4_G128, ActScheme(),
               method=GPTQ, rounding=GPTQ_BEST, transforms=OST_FUSED + (TransformSpec("r4"),)),
        Recipe("w4a4kv4-ost", "OSTQuant's learned transforms (trained through INT4 activations and KV cache, float "
               "weights) fused, R3 and R4 online, then GPTQ; INT4 weights, activations and KV cache as w4a4kv4-rot",
               INT4_G128, A4_TOKEN, method=GPTQ, rounding=GPTQ_BEST, kv_cache=KV4,
               transforms=(TransformSpec("fold_norms"), TransformSpec("r3"), TransformSpec("ost"), TransformSpec("r4"))),
        Recipe("w4a16-affine", "AffineQuant: per block, norm-side scales and per-KV-head v->o matrices (diagonally "
               "dominant), trained with learned clipping to match the float block through INT4 weight fake-quant, "
               "folded; then w4a16 (GPTQ, its own clipping); a plain compressed-tensors checkpoint", INT4_G128, method=GPTQ,
               rounding=GPTQ_BEST, transforms=(TransformSpec("affine"),)),
        Recipe("w3a16-disc", "INT3 symmetric group-64 weights: GPTQ's grid and rounding, then DiscQuant: every code "
               "chosen between its two grid neighbours by distillation through the whole model; a plain integer checkpoint",
               INT3_G64, method="disc", rounding=GPTQ_BEST),
        Recipe("w4a16-disc", "INT4 symmetric group-64 weights: GPTQ's grid and rounding refined by DiscQuant (as w3a16-disc)",
               INT4_G64, method="disc", rounding=GPTQ_BEST),
        Recipe("w2a16-disc", "INT2 asymmetric group-64 weights: GPTQ's grid and rounding refined by DiscQuant (as w3a16-disc)",
               WeightScheme(bits=2, strategy="group", group_size=64, symmetric=False), method="disc", rounding=GPTQ_BEST),
        Recipe("w3a16-rot-disc", "R1 + R2 Hadamard rotations fused into the weights, then w3a16-disc; a plain "
               "compressed-tensors checkpoint", INT3_G64, method="disc", rounding=GPTQ_BEST, transforms=ROT_FUSED),
        Recipe("w4a16-lrqat", "INT4 symmetric group-64 weights: RTN on the LP-4 range, then LR-QAT: rank-32 adapters in "
               "the integer domain and the scales trained by distillation, merged into the codes; a plain integer checkpoint",
               INT4_G64, method="lrqat"),
        Recipe("w4a8-fp8", "FireQ: INT4 symmetric group-128 weights with E4M3 group scales and a power-of-two tensor "
               "scale, GPTQ; FP8 E4M3 dynamic per-token activations",
               WeightScheme("int", 4, "group", 128, scale_format="e4m3"), ActScheme(format="float"),
               method=GPTQ, rounding=GPTQ_BEST),
    )
}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(hint: Any) -> str:
    """How a recipe file spells the type ``hint``: "an integer", "a list of integers or null"..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if len(args) < len(typing.get_args(hint)):  # X | None
        return f"{' or '.join(_describe(a) for a in args)} or null"
    return _TYPE_NAMES.get(hint, f"a {getattr(hint, '__name__', hint)} mapping")


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` of a dataclass field (a list becomes a tuple, an integer a float where a
    number is expected), or a LowbitError that names the field, the expected type and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    for t in [a for a in args if a is not type(None)] if args and origin is not tuple else [hint]:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, t) and (t is bool or not isinstance(value, bool)):  # int, str, bool, dataclasses
            return value
    raise LowbitError(f"{where} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct frozen dataclass ``cls`` from a dict, rejecting unknown keys with the list of valid ones and
    values of the wrong type with the type expected."""
    if not isinstance(data, dict):
        raise LowbitError(f"{where} must be a mapping, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise LowbitError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def recipe_from_dict(data: Any) -> Recipe:
    """Build a Recipe from a dict (as read from JSON/YAML). Nested schemes are dicts; ``activations`` may be null."""
    if not isinstance(data, dict):
        raise LowbitError(f"a recipe must be a mapping, got {type(data).__name__}")
    d = dict(data)
    for key, cls in (("weights", WeightScheme), ("activations", ActScheme), ("rounding", RoundingOptions),
                     ("training", TrainingOptions), ("baq", BAQOptions), ("kv_cache", ActScheme)):
        if d.get(key) is not None:
            d[key] = _build(cls, d[key], f"recipe.{key}")
    if isinstance(d.get("transforms"), list):
        d["transforms"] = [_build(TransformSpec, t, f"recipe.transforms[{i}]") for i, t in enumerate(d["transforms"])]
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
