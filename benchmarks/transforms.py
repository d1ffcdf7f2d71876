"""Rotations without quantization: the float model's WikiText-2 perplexity before and after, and the time the
transforms take (the transform stage must leave the float model's outputs unchanged, issue 14).

    LOWBIT_DATA_DIR=../shared/data python benchmarks/transforms.py --limit 16

Prints one JSON line per transform list and a Markdown table (paste it into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the `kernels` package that
# transformers imports: drop it (the package is found through the install instead).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lowbit.calibrate.sources import wikitext2_test_text
from lowbit.models.loading import check_model_dir, load_float_model, resolve_model_dir
from lowbit.quantize.evaluate import perplexity
from lowbit.quantize.transforms.apply import apply_model_transforms, check_model
from lowbit.quantize.transforms.spec import TransformSpec as T

CONFIGS = {
    "float": (),
    "R1+R2 (fused)": (T("fold_norms"), T("r1"), T("r2")),
    "R1+R2 fused, R3+R4 online": (T("fold_norms"), T("r1"), T("r2"), T("r3"), T("r4")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=16)
    args = ap.parse_args()
    model_dir = resolve_model_dir(args.model)
    config = check_model_dir(model_dir)
    text = wikitext2_test_text(None)
    rows = []
    for name, specs in CONFIGS.items():
        model, tokenizer, table, _ = load_float_model(model_dir)
        t0 = time.perf_counter()
        apply_model_transforms(model, table, check_model(specs, table, config), specs)
        seconds = time.perf_counter() - t0
        res = perplexity(model, tokenizer, text, seqlen=args.seqlen, limit=args.limit, progress=False)
        rows.append({"transforms": name, "transform_s": round(seconds, 2), **res})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ppl"]
    print("| transforms | ppl | change | transform time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['transforms']} | {r['ppl']:.4f} | {100 * (r['ppl'] / base - 1):+.4f} % | {r['transform_s']} |")


if __name__ == "__main__":
    main()
