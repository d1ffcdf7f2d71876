"""Human-readable summaries: the table at the end of `quantize model` and `quantize inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import (
    OnlineTransform, layer_nbytes, parse_quantization_config, parse_transform_config, tensor_nbytes, weight_files,
    weights_size,
)
from lowbit.quantize.destination import REPORT_FILE
from lowbit.quantize.results import QuantizeResult
from lowbit.quantize.transforms import TRANSFORMS


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _worst(layers: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    return sorted(layers, key=lambda l: l["output_rel_err"], reverse=True)[:top]


def _layer_line(l: dict[str, Any]) -> str:
    g = f"g{l['group_size']}" if l["strategy"] == "group" else l["strategy"]
    scheme = l.get("scheme") or f"int{l['bits']} {g}"  # reports before the scheme name was recorded
    return f"  {l['name']:<40} {scheme:<28} out-err {l['output_rel_err']:.4f}  w-err {l['weight_rel_err']:.4f}"


def print_summary(result: QuantizeResult, top: int = 5) -> None:
    """Print the end-of-run table: sizes, bits per weight, time, fallbacks, worst layers."""
    from dataclasses import asdict

    layers = [asdict(l) for l in result.layers]
    ratio = result.size_before / max(result.size_after, 1)
    print(f"wrote {result.out}")
    print(f"  recipe            {result.recipe.name} ({result.recipe.method})")
    print(f"  size before       {human_bytes(result.size_before)}")
    print(f"  size after        {human_bytes(result.size_after)}  ({ratio:.2f}x smaller)")
    print(f"  bits per weight   {result.bits_per_weight:.3f} over {sum(l['shape'][0] * l['shape'][1] for l in layers):,} quantized weights")
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "rounding")
    print(f"  time              {result.seconds:.1f} s" + (f" ({parts})" if parts else ""))
    fallbacks = [l for l in layers if l["fallback"]]
    if fallbacks:
        print(f"  group fallbacks   {len(fallbacks)} layers (e.g. {fallbacks[0]['name']}: {fallbacks[0]['fallback']})")
    print(f"worst {min(top, len(layers))} layers by relative output error:")
    for l in _worst(layers, top):
        print(_layer_line(l))


def inspect_dir(directory: Path) -> dict[str, Any]:
    """Collect what `quantize inspect` shows from a quantized directory."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise LowbitError(f"{directory} has no config.json: not a model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LowbitError(f"{cfg_path} is not valid JSON: {e}") from None
    qc = config.get("quantization_config")
    if qc is None:
        raise LowbitError(f"{directory} is not quantized (config.json has no quantization_config)")
    groups, ignore = parse_quantization_config(qc)
    files = weight_files(directory)  # model.safetensors, or the shards model.safetensors.index.json names
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LowbitError(f"{directory}: weight files named by its index are missing: {', '.join(missing[:3])}")
    report_path = directory / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # Bits per weight from the bytes the files hold for each layer the report lists (its shape gives the count).
    sizes = tensor_nbytes(directory)
    layers = report.get("layers", [])
    nbytes = {l["name"]: layer_nbytes(sizes, l["name"]) for l in layers}
    layers = [{**l, "bits_per_weight": 8 * nbytes[l["name"]] / (l["shape"][0] * l["shape"][1])} for l in layers]
    n_weights = sum(l["shape"][0] * l["shape"][1] for l in layers)
    bits = 8 * sum(nbytes.values()) / n_weights if n_weights else None
    online = parse_transform_config(qc)
    recipe = report.get("recipe", qc.get("lowbit", {}).get("recipe")) or {}
    return {
        "directory": str(directory),
        "format": qc.get("format"),
        "format_version": qc.get("lowbit", {}).get("format_version"),
        "recipe": report.get("recipe", qc.get("lowbit", {}).get("recipe")),
        "schemes": [
            {"layers": len(t), "weights": g["weights"], "input_activations": g.get("input_activations"), "format": g.get("format")}
            for t, g in zip((t for t, _ in groups), qc["config_groups"].values())
        ],
        "ignore": ignore,
        "size_before": report.get("float_bytes"),
        "size_after": weights_size(directory) if files else None,
        "bits_per_weight": bits,
        "group_fallbacks": {l["name"]: l["fallback"] for l in layers if l.get("fallback")},
        "layers": layers,
        "fused_transforms": [t["name"] for t in recipe.get("transforms", []) if t["name"] not in ONLINE_TRANSFORMS],
        "transforms": [
            {"group": t.group, "type": t.kind, "location": t.location, "block": t.block, "modules": len(t.targets),
             "bytes": sum(n for k, n in sizes.items() if k.endswith(f".{t.group}_{t.location}.weight"))}
            for t in online
        ],
        "kv_cache": qc.get("kv_cache_scheme"),
        "warning": runtime_warning(online, qc.get("kv_cache_scheme")),
    }


# Transforms that leave modules running at inference (quantize/transforms/: registered with online=True).
ONLINE_TRANSFORMS = tuple(name for name, t in TRANSFORMS.items() if t.online)


def runtime_warning(online: list[OnlineTransform], kv: dict[str, Any] | None) -> str | None:
    """What a runtime other than lowbit would get wrong with this checkpoint (docs/FORMAT.md), or None."""
    if not online and not kv:
        return None
    attention = sorted({t.location for t in online if t.location != "input"}) + (["the quantized KV cache"] if kv else [])
    if attention:
        return (f"this checkpoint needs lowbit (lowbit.load, quantize eval): {', '.join(attention)} are applied by no "
                "other runtime today, and transformers applies no online transform")
    return ("this checkpoint has online transforms (input of linears): it needs lowbit or vLLM; transformers does not "
            "apply them and would compute wrong outputs")


def print_inspect(info: dict[str, Any], top: int) -> None:
    """Print :func:`inspect_dir`'s result as text."""
    print(f"{info['directory']}  (format {info['format']}, lowbit format v{info['format_version']})")
    if info["recipe"]:
        print(f"  recipe            {info['recipe']['name']} ({info['recipe']['method']})")
    for s in info["schemes"]:
        w, a = s["weights"], s["input_activations"]
        g = f"group {w['group_size']}" if w["strategy"] in ("group", "tensor_group") else w["strategy"]
        kind = w.get("type", "int")
        sym = "" if kind == "float" else (" sym" if w["symmetric"] else " asym")
        act = "not quantized" if a is None else f"{a.get('type', 'int')}{a['num_bits']} dynamic per-{a['strategy']}"
        print(f"  {s['layers']:>4} layers      {kind}{w['num_bits']} {g}{sym}, activations {act} [{s['format']}]")
    print(f"  kept in float     {', '.join(info['ignore']) or '-'}")
    if info["size_before"]:
        print(f"  size before       {human_bytes(info['size_before'])}")
    if info["size_after"]:
        print(f"  size after        {human_bytes(info['size_after'])}")
    if info["bits_per_weight"]:
        print(f"  bits per weight   {info['bits_per_weight']:.3f}")
    if info.get("fused_transforms"):
        print(f"  fused transforms  {', '.join(info['fused_transforms'])}")
    for t in info.get("transforms", []):
        print(f"  online transform  {t['group']} {t['type']} (order {t['block']}) at {t['location']} of {t['modules']} "
              f"modules, {human_bytes(t['bytes'])}")
    if info.get("kv_cache"):
        kv = info["kv_cache"]
        print(f"  KV cache          int{kv['num_bits']} {'sym' if kv['symmetric'] else 'asym'} per token and head")
    if info.get("warning"):
        print(f"  warning: {info['warning']}")
    fb = info["group_fallbacks"]
    if fb:
        print(f"  group fallbacks   {len(fb)} layers:")
        for reason in sorted(set(fb.values())):
            print(f"    {sum(1 for v in fb.values() if v == reason):>4} x {reason}")
    if info["layers"]:
        print(f"worst {min(top, len(info['layers']))} layers by relative output error:")
        for l in _worst(info["layers"], top):
            print(_layer_line(l))
