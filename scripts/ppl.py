"""WikiText-2 perplexity of a model directory (float or lowbit-quantized), printed as JSON.

    python scripts/ppl.py ./smollm2-w4a8 --seqlen 2048 --limit 8

Protocol: the raw test rows joined with "\\n\\n", tokenized once, non-overlapping windows of --seqlen tokens,
mean token NLL over the windows, exp. The same numbers as `quantize eval ppl`.
"""

from __future__ import annotations

import argparse
import json
import sys

import transformers

import lowbit
from lowbit.calibrate.sources import wikitext2_test_text
from lowbit.errors import LowbitError
from lowbit.quantize.evaluate import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description="WikiText-2 perplexity of a model directory, as JSON.")
    parser.add_argument("model", help="model directory: a Hugging Face checkpoint or a lowbit-quantized one")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N windows")
    parser.add_argument(
        "--data",
        default=None,
        help="WikiText-2 test rows (.json list of strings) or raw text (.txt); "
        "default: $LOWBIT_DATA_DIR/wikitext-2/test_rows.json, else the Hugging Face hub",
    )
    args = parser.parse_args()
    try:
        model = lowbit.load(args.model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        text = wikitext2_test_text(args.data)
        result = perplexity(model, tokenizer, text, seqlen=args.seqlen, limit=args.limit)
    except LowbitError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
