"""The on-disk format: safetensors tensors + a compressed-tensors ``quantization_config`` in config.json.

docs/FORMAT.md is the spec. In short: ``config.json`` carries ``quantization_config`` with
``quant_method: compressed-tensors``, one config group per distinct (weight scheme, activation scheme)
whose ``targets`` are the exact module names it covers, an ``ignore`` list, and a ``lowbit`` section with
``format_version`` (checked by the loader) and what produced the file. Tensors use the compressed-tensors
names (see kernels/quant_linear.py). Nothing is inferred from file names (DESIGN.md principle 8).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.formats.precision import FLOAT_DTYPES
from lowbit.formats.storage import DUAL, FLOAT_SCALES, FP8SCALE, MXFP4, NVFP4, STORAGE_FORMATS, storage_format

# 2: online transforms (transform_config) and a quantized KV cache (kv_cache_scheme) (docs/FORMAT.md)
FORMAT_VERSION = 2
QUANT_METHOD = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"  # a checkpoint in one file; a larger one is sharded as transformers shards it:
INDEX_FILE = "model.safetensors.index.json"  # {"metadata": {"total_size": n}, "weight_map": {tensor: shard file}}


@dataclass(frozen=True)
class LayerScheme:
    """What one linear layer holds: its weight scheme, activation scheme, storage format and, for formats with
    float scales (storage.FLOAT_SCALES), the dtype they are stored in (None: the model's dtype)."""

    weights: WeightScheme
    activations: ActScheme | None
    format: str
    scale_dtype: torch.dtype | None = None


def _weight_args(s: WeightScheme, fmt: str, scale_dtype: torch.dtype | None) -> dict[str, Any]:
    # compressed-tensors calls NVFP4's group scales under a tensor-wide global scale "tensor_group".
    strategy = "tensor_group" if fmt == NVFP4 and s.strategy == "group" else s.strategy
    args = {
        "num_bits": s.bits,
        "type": s.format,
        "symmetric": s.symmetric,
        "strategy": strategy,
        "group_size": s.group_size,
        "dynamic": False,
    }
    if fmt in SCALE_DTYPE_OF:  # as compressed-tensors' NVFP4/MXFP4 presets write it
        args["scale_dtype"] = SCALE_DTYPE_OF[fmt]
    elif scale_dtype is not None and fmt in FLOAT_SCALES:  # compressed-tensors: scales rounded to this dtype
        args["scale_dtype"] = str(scale_dtype)
    return args


# Element formats compressed-tensors' args cannot name (its "float" type is E4M3 at 8 bits, E2M1 at 4):
# stored in the lowbit section, per config group, and these defaults apply when it is absent.
DEFAULT_FP = {8: "e4m3", 6: "e2m3", 4: "e2m1"}  # what compressed-tensors reads for each width
SCALE_FORMAT_OF = {NVFP4: "e4m3", MXFP4: "e8m0", DUAL: "dual", FP8SCALE: "e4m3"}
SCALE_DTYPE_OF = {NVFP4: "torch.float8_e4m3fn", MXFP4: "torch.uint8"}


def _act_args(a: ActScheme | None) -> dict[str, Any] | None:
    """compressed-tensors QuantizationArgs of a dynamic activation scheme (its clip ratio, which they cannot
    name, goes to the lowbit section: see _elements)."""
    if a is None:
        return None
    args = {"num_bits": a.bits, "type": a.format, "symmetric": a.symmetric, "strategy": a.strategy, "dynamic": True}
    if a.strategy == "group":
        args["group_size"] = a.group_size
    return args


def build_quantization_config(
    layers: dict[str, LayerScheme], ignore: list[str], lowbit_info: dict[str, Any],
    transforms: list[OnlineTransform] | None = None, kv: tuple[ActScheme, int] | None = None,
) -> dict[str, Any]:
    """compressed-tensors ``quantization_config`` for per-layer schemes.

    Args:
        layers: module name -> scheme, for every quantized linear.
        ignore: module names of linears left in float (e.g. "lm_head").
        lowbit_info: extra JSON stored under ``lowbit`` (recipe, group fallbacks...); format_version is added.
        transforms: the model's online transforms, written as ``transform_config`` (none: the key is absent).
        kv: the KV-cache scheme and the head_dim it groups by, written as ``kv_cache_scheme`` (None: null).
    """
    groups: dict[LayerScheme, list[str]] = {}
    for name, ls in layers.items():
        groups.setdefault(ls, []).append(name)
    formats = {ls.format for ls in groups}
    config_groups = {
        f"group_{i}": {
            "targets": names,
            "weights": _weight_args(ls.weights, ls.format, ls.scale_dtype),
            "input_activations": _act_args(ls.activations),
            "output_activations": None,
            "format": ls.format,
        }
        for i, (ls, names) in enumerate(groups.items())
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None if kv is None else kv_cache_args(*kv),
        "lowbit": {"format_version": FORMAT_VERSION, **lowbit_info, **_elements(groups), **_kv_clip(kv)},
        **({"transform_config": build_transform_config(transforms)} if transforms else {}),
    }


def _kv_clip(kv: tuple[ActScheme, int] | None) -> dict[str, Any]:
    return {} if kv is None or kv[0].clip_ratio == 1.0 else {"kv_cache_clip_ratio": kv[0].clip_ratio}


def _elements(groups: dict[LayerScheme, list[str]]) -> dict[str, Any]:
    fp = {f"group_{i}": ls.weights.fp for i, ls in enumerate(groups) if ls.weights.fp not in (None, DEFAULT_FP.get(ls.weights.bits))}
    clip = {f"group_{i}": ls.activations.clip_ratio for i, ls in enumerate(groups)
            if ls.activations is not None and ls.activations.clip_ratio != 1.0}
    return ({"fp_elements": fp} if fp else {}) | ({"act_clip_ratios": clip} if clip else {})


def _scheme_from_args(
    w: dict[str, Any], a: dict[str, Any] | None, fmt: str, where: str, fp: str | None = None, act_clip: Any = None
) -> LayerScheme:
    if fmt not in STORAGE_FORMATS:
        raise LowbitError(f"{where}: storage format {fmt!r} is not supported ({', '.join(STORAGE_FORMATS)})")
    try:
        kind, bits = w.get("type", "int"), int(w["num_bits"])
        strategy = "group" if w.get("strategy") == "tensor_group" else w.get("strategy", "tensor")
        weights = WeightScheme(
            format=kind,
            bits=bits,
            strategy=strategy,
            group_size=w.get("group_size") if strategy == "group" else None,
            symmetric=bool(w.get("symmetric", True)),
            fp=(fp or DEFAULT_FP.get(bits)) if kind == "float" else None,
            scale_format=SCALE_FORMAT_OF.get(fmt, "float"),
        )
        act = None
        if a is not None:
            if not a.get("dynamic", False):
                raise LowbitError(f"{where}: static activation scales are not supported")
            strategy = a.get("strategy", "token")
            act = ActScheme(format=a.get("type", "int"), bits=int(a["num_bits"]), strategy=strategy,
                            symmetric=bool(a.get("symmetric", True)),
                            group_size=int(a["group_size"]) if strategy == "group" and a.get("group_size") is not None else None,
                            clip_ratio=1.0 if act_clip is None else float(act_clip))
        elif act_clip is not None:
            raise LowbitError(f"{where}: an activation clip ratio without input_activations")
    except (KeyError, TypeError, ValueError) as e:
        raise LowbitError(f"{where}: malformed quantization args ({e})") from None
    if storage_format(weights) != fmt:
        raise LowbitError(f"{where}: {weights.name} weights are not stored as {fmt!r}")
    return LayerScheme(weights, act, fmt, _float_scale_dtype(w.get("scale_dtype"), fmt, where))


def _float_scale_dtype(name: Any, fmt: str, where: str) -> torch.dtype | None:
    """The stored dtype of float scales named by a config's ``scale_dtype`` ("torch.float16"), or None when it
    is absent (the model's dtype) or the format's scales are not float (their dtype is the format's)."""
    if name is None or fmt not in FLOAT_SCALES:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in FLOAT_DTYPES:
        raise LowbitError(f"{where}: scale_dtype {name!r} is not float32, float16 or bfloat16")
    return dtype


# quantization_config keys that change what the stored weights mean and that lowbit does not apply yet: a
# checkpoint with one of them set would load as a plain one and compute wrong outputs. (transform_config and
# kv_cache_scheme are applied: parse_transform_config, parse_kv_cache_scheme.)
UNSUPPORTED_KEYS = ("sparsity_config",)


def check_supported(qc: dict[str, Any]) -> None:
    """Refuse, with one line naming the key, a config that sets a key of :data:`UNSUPPORTED_KEYS` (null or empty
    counts as unset); lowbit's loader would otherwise ignore what it says."""
    for key in UNSUPPORTED_KEYS:
        if qc.get(key) not in (None, {}, []):
            raise LowbitError(f"quantization_config has a {key!r}, which lowbit does not apply yet: it cannot load this "
                              "checkpoint correctly")


def parse_quantization_config(qc: Any) -> tuple[list[tuple[list[str], LayerScheme]], list[str]]:
    """Read a ``quantization_config`` back into ``([(targets, scheme)...], ignore)``, checking the version."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise LowbitError(f"quantization_config is not a {QUANT_METHOD} config")
    version = qc.get("lowbit", {}).get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LowbitError(f"checkpoint format version {version} is newer than this lowbit reads ({FORMAT_VERSION}); upgrade lowbit")
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        where = f"quantization_config.config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise LowbitError(f"{where}: needs a 'weights' mapping")
        fmt = g.get("format") or qc.get("format")
        fp = (qc.get("lowbit", {}).get("fp_elements") or {}).get(gname)
        clip = (qc.get("lowbit", {}).get("act_clip_ratios") or {}).get(gname)
        groups.append((list(g.get("targets", [])),
                       _scheme_from_args(g["weights"], g.get("input_activations"), fmt, where, fp, clip)))
    if not groups:
        raise LowbitError("quantization_config has no config_groups")
    return groups, list(qc.get("ignore") or [])


def matches(name: str, class_name: str, target: str) -> bool:
    """compressed-tensors target matching: a class name, an exact module name, or ``re:<regex>``."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == class_name


def scheme_for(
    name: str, class_name: str, groups: list[tuple[list[str], LayerScheme]], ignore: list[str]
) -> LayerScheme | None:
    """The scheme a module gets, or None if it is ignored or no group targets it."""
    if any(matches(name, class_name, t) for t in ignore):
        return None
    for targets, ls in groups:
        if any(matches(name, class_name, t) for t in targets):
            return ls
    return None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights: the shards its index names (in the index's order of
    first appearance), else every ``*.safetensors`` file of the directory, sorted by name."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [directory / f for f in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index: {e}") from None
    return sorted(directory.glob("*.safetensors"))


def weights_size(directory: Path) -> int:
    """Bytes of a checkpoint's weight files (one file or every shard)."""
    return sum(f.stat().st_size for f in weight_files(directory))


def tensor_nbytes(directory: Path) -> dict[str, int]:
    """Bytes each tensor of the directory's safetensors files takes, read from the files' headers (8 bytes of
    header length, then its JSON: ``name -> {dtype, shape, data_offsets}``); no tensor data is read."""
    sizes: dict[str, int] = {}
    for path in weight_files(directory):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise LowbitError(f"cannot read the safetensors header of {path}: {e}") from None
    return sizes


def layer_nbytes(sizes: dict[str, int], layer: str) -> int:
    """Bytes of a quantized linear's weight tensors (``<layer>.weight``, ``<layer>.weight_*``; not its bias)."""
    return sum(n for k, n in sizes.items() if k == f"{layer}.weight" or k.startswith(f"{layer}.weight_"))


# Online transform types and locations lowbit applies (kernels/online.py, models/attention.py).
TRANSFORM_TYPES = ("hadamard", "random-hadamard")
TRANSFORM_LOCATIONS = ("input", "q_attn", "k_cache")


@dataclass(frozen=True)
class OnlineTransform:
    """One online transform of a checkpoint: config group ``group`` applies a ``kind`` transform (a block-diagonal
    Hadamard of order ``block``) at ``location`` of every module in ``targets``; its matrix is stored per module
    as ``<module>.<group>_<location>.weight``."""

    group: str
    kind: str
    location: str
    targets: tuple[str, ...]
    block: int


def build_transform_config(transforms: list[OnlineTransform]) -> dict[str, Any]:
    """compressed-tensors' ``transform_config`` (ALGORITHMS.md 12.4) for the online transforms of a model: one
    config group per (group, kind, block), one ``apply`` entry per location, exact module names as targets."""
    groups: dict[str, dict[str, Any]] = {}
    for t in transforms:
        g = groups.setdefault(t.group, {
            "type": t.kind, "apply": [], "randomize": False, "requires_grad": False, "head_dim": t.block,
            "precision": "torch.float32",
        })
        if (g["type"], g["head_dim"]) != (t.kind, t.block):
            raise LowbitError(f"transform group {t.group} mixes {g['type']}/{g['head_dim']} with {t.kind}/{t.block}")
        g["apply"].append({"targets": list(t.targets), "location": t.location, "inverse": False, "ignore": []})
    return {"config_groups": groups}


def parse_transform_config(qc: dict[str, Any]) -> list[OnlineTransform]:
    """The online transforms a ``quantization_config`` declares; one line for what lowbit cannot apply."""
    tc = qc.get("transform_config")
    if tc in (None, {}, []):
        return []
    found = []
    try:
        for gname, g in tc["config_groups"].items():
            where = f"transform_config.config_groups.{gname}"
            if g.get("type") not in TRANSFORM_TYPES:
                raise LowbitError(f"{where}: transform type {g.get('type')!r} is not one lowbit applies "
                                  f"({', '.join(TRANSFORM_TYPES)})")
            block = g.get("head_dim")
            if not isinstance(block, int) or block < 1:
                raise LowbitError(f"{where}: needs head_dim, the order of its (block) Hadamard matrix")
            for a in g["apply"]:
                if a.get("location") not in TRANSFORM_LOCATIONS or a.get("inverse") or a.get("ignore"):
                    raise LowbitError(f"{where}: lowbit applies online transforms at {', '.join(TRANSFORM_LOCATIONS)} "
                                      f"with no inverse and no ignore list, not {a}")
                found.append(OnlineTransform(gname, g["type"], a["location"], tuple(a["targets"]), block))
    except (KeyError, TypeError, AttributeError) as e:
        raise LowbitError(f"quantization_config.transform_config is malformed ({e})") from None
    return found


def kv_cache_args(kv: ActScheme, head_dim: int) -> dict[str, Any]:
    """compressed-tensors' ``kv_cache_scheme`` for lowbit's per-token, per-head KV quantization: a dynamic group
    of ``head_dim`` channels of the flattened ``[tokens, kv_heads * head_dim]`` keys and values."""
    return {"num_bits": kv.bits, "type": kv.format, "symmetric": kv.symmetric, "strategy": "group",
            "group_size": head_dim, "dynamic": True}


def parse_kv_cache_scheme(qc: dict[str, Any], head_dim: int) -> ActScheme | None:
    """The KV scheme a config declares (None: float), as applied per token and head; one line if lowbit cannot."""
    a = qc.get("kv_cache_scheme")
    if a in (None, {}):
        return None
    clip = float((qc.get("lowbit") or {}).get("kv_cache_clip_ratio", 1.0))
    try:
        if not (a.get("dynamic") and a.get("strategy") == "group" and a.get("group_size") == head_dim):
            raise LowbitError(f"kv_cache_scheme: lowbit applies dynamic per-token, per-head KV quantization (strategy "
                              f"group, group_size {head_dim}), not {a}")
        return ActScheme(format=a.get("type", "int"), bits=int(a["num_bits"]), symmetric=bool(a.get("symmetric", True)),
                         clip_ratio=clip)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LowbitError(f"quantization_config.kv_cache_scheme is malformed ({e})") from None
