"""Training-loss curves of the learned transforms, read from quantized checkpoints' reports: a PNG and a JSON.

    python benchmarks/loss_curve.py out/w4a4kv4-ost out/w4a16-ost --png benchmarks/results/ost_loss.png \
        --json benchmarks/results/ost_loss.json

For OSTQuant (``trained_transforms.ost`` in ``quantize_report.json``) the curve is the KL-Top loss per step (thin)
and its running mean over 8 steps (thick), with the held-out loss before and after training in the JSON. For
AffineQuant (``trained_transforms.affine``) it is the per-block MSE of each epoch divided by that block's first
epoch, averaged over blocks. For DiscQuant and LR-QAT (``trained_rounding``) it is the distillation loss per step, as
for OSTQuant, with the held-out loss of the rounded model before and after. The PNG is drawn with numpy and written with zlib (no plotting package): one colour
per checkpoint, the y range and step count printed in the corner, the same order as the command line.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from pathlib import Path

import numpy as np

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
# 3 x 5 pixel glyphs for the corner labels.
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "x": "000101010101000", "y": "101101111001111", "s": "111100111001111",
    ":": "000010000010000", "/": "001001010100100",
}


def _per_step(kind: str, entry: dict) -> dict:
    """A per-step loss curve with its running mean over 8 steps and the held-out losses."""
    losses = [float(v) for v in entry["losses"]]
    k = 8
    smooth = [float(np.mean(losses[max(0, i - k + 1) : i + 1])) for i in range(len(losses))]
    return {"kind": kind, "losses": losses, "smoothed": smooth, "settings": entry["settings"],
            "held_out_loss_before": entry.get("held_out_loss_before"),
            "held_out_loss_after": entry.get("held_out_loss_after"),
            "seconds": entry.get("seconds"), "codes_changed": entry.get("codes_changed")}


def curves(report: dict) -> dict:
    """``{"kind", "losses", "smoothed", ...}`` from one checkpoint report."""
    trained = report.get("trained_transforms", {})
    if "trained_rounding" in report:
        return _per_step(report["trained_rounding"]["method"], report["trained_rounding"])
    if "ost" in trained:
        return _per_step("ost", trained["ost"])
    if "affine" in trained:
        per_block = [[float(v) for v in b["losses"]] for b in trained["affine"]]
        rel = np.array([[v / b[0] for v in b] for b in per_block])  # [blocks, epochs]
        return {"kind": "affine", "per_block": per_block, "losses": rel.mean(0).tolist(),
                "smoothed": rel.mean(0).tolist(), "settings": trained["affine"][0]["settings"]}
    raise SystemExit("the report has no trained transform (ost or affine) or trained rounding (disc, lrqat)")


def _text(img: np.ndarray, x: int, y: int, s: str, colour: tuple[int, int, int], scale: int = 2) -> None:
    for c in s:
        g = GLYPHS.get(c, GLYPHS[" "])
        for i, bit in enumerate(g):
            if bit == "1":
                r, col = divmod(i, 3)
                img[y + r * scale : y + (r + 1) * scale, x + col * scale : x + (col + 1) * scale] = colour
        x += 4 * scale


def _line(img: np.ndarray, p: tuple[float, float], q: tuple[float, float], colour: tuple[int, int, int], width: int) -> None:
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    for t in np.linspace(0, 1, n):
        x, y = int(round(p[0] + t * (q[0] - p[0]))), int(round(p[1] + t * (q[1] - p[1])))
        img[max(0, y - width // 2) : y + width // 2 + 1, max(0, x - width // 2) : x + width // 2 + 1] = colour


def draw(series: list[dict], width: int = 800, height: int = 480) -> np.ndarray:
    """An RGB ``[height, width, 3]`` uint8 image of every series' losses (thin) and smoothed losses (thick)."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 60, width - 20, 40, height - 40
    img[top:bottom, left] = img[bottom, left:right] = (0, 0, 0)
    values = [v for s in series for v in s["losses"]]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    steps = max(len(s["losses"]) for s in series)

    def at(i: int, v: float) -> tuple[float, float]:
        return left + (right - left) * i / max(steps - 1, 1), bottom - (bottom - top) * (v - lo) / (hi - lo)

    for k, s in enumerate(series):
        c = COLOURS[k % len(COLOURS)]
        for key, w in (("losses", 1), ("smoothed", 3)):
            pts = [at(i, v) for i, v in enumerate(s[key])]
            for p, q in zip(pts, pts[1:]):
                _line(img, p, q, c, w)
        _text(img, right - 60, top + 14 * k, f"{k + 1}", c)
    _text(img, 4, top - 4, f"{hi:.4f}", (0, 0, 0))
    _text(img, 4, bottom - 6, f"{lo:.4f}", (0, 0, 0))
    _text(img, right - 40, bottom + 8, f"{steps}", (0, 0, 0))
    _text(img, left, bottom + 8, "0", (0, 0, 0))
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    """Write an RGB uint8 ``[h, w, 3]`` array as a PNG (8-bit truecolour, no filter)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="quantized output directories (with quantize_report.json)")
    ap.add_argument("--png", type=Path, required=True, help="where the plot goes")
    ap.add_argument("--json", type=Path, required=True, help="where the numbers go")
    args = ap.parse_args()
    series = []
    for d in args.checkpoints:
        report = json.loads((d / "quantize_report.json").read_text())
        series.append({"checkpoint": str(d), "recipe": report.get("recipe", {}).get("name"), **curves(report)})
    write_png(args.png, draw(series))
    args.json.write_text(json.dumps(series, indent=1) + "\n")
    for k, s in enumerate(series, 1):
        first, last = s["smoothed"][0], s["smoothed"][-1]
        print(f"{k}: {s['recipe']} ({s['kind']}): {len(s['losses'])} points, smoothed {first:.4f} -> {last:.4f}"
              + (f", held-out {s['held_out_loss_before']:.4f} -> {s['held_out_loss_after']:.4f}"
                 if s.get("held_out_loss_before") is not None else ""))


if __name__ == "__main__":
    main()
