"""Quantize a model with each preset and measure wall time, sizes and WikiText-2 perplexity.

    LOWBIT_DATA_DIR=../shared/data python benchmarks/presets.py --presets w4a16,w8a8,w4a8 --limit 16

Writes benchmarks/results/presets.json and prints a Markdown table (paste it into BENCHMARKS.md).
Each preset runs in its own process so its wall time and peak memory are its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS of the child in MiB, stdout)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) // 1024
    return time.perf_counter() - t0, peak, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model directory or alias")
    ap.add_argument("--presets", default="w4a16,w8a8,w4a8", help="comma-separated preset names")
    ap.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    ap.add_argument("--limit", type=int, default=16, help="perplexity windows scored")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--workdir", type=Path, default=Path("out/bench"), help="where the quantized models go")
    ap.add_argument("--skip-float", action="store_true", help="do not measure the float model")
    args = ap.parse_args()

    q = [sys.executable, "-m", "lowbit.cli"]
    rows = []
    if not args.skip_float:
        _, _, out = run(q + ["eval", "ppl", args.model, "--seqlen", str(args.seqlen), "--limit", str(args.limit), "--json"])
        rows.append({"preset": "float", **json.loads(out.splitlines()[-1])})
    for preset in args.presets.split(","):
        out_dir = args.workdir / preset
        secs, peak, _ = run(q + ["model", args.model, "--recipe", preset, "--out", str(out_dir), "--overwrite", "--samples", str(args.samples)])
        _, _, out = run(q + ["eval", "ppl", str(out_dir), "--seqlen", str(args.seqlen), "--limit", str(args.limit), "--json"])
        info = json.loads(subprocess.run(q + ["inspect", str(out_dir), "--json"], capture_output=True, text=True, check=True).stdout)
        rows.append({"preset": preset, "quantize_s": round(secs, 1), "peak_rss_mib": peak, "size_before": info["size_before"],
                     "size_after": info["size_after"], "bits_per_weight": info["bits_per_weight"], **json.loads(out.splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/presets.json").write_text(json.dumps(rows, indent=2))
    print("| preset | ppl | windows x seqlen | quantize wall (s) | peak RSS (MiB) | model.safetensors | bits/weight |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size_before'] / 2**20:.1f} -> {r['size_after'] / 2**20:.1f} MiB" if "size_after" in r else "-"
        print(f"| {r['preset']} | {r['ppl']:.3f} | {r['windows']} x {r['seqlen']} | {r.get('quantize_s', '-')} | "
              f"{r.get('peak_rss_mib', '-')} | {size} | {r.get('bits_per_weight') and round(r['bits_per_weight'], 3) or '-'} |")


if __name__ == "__main__":
    main()
