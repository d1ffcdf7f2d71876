"""Zero-shot accuracy of a model directory (float or lowbit-quantized), printed as JSON.

    python scripts/accuracy.py ./smollm2-w4a8 --tasks piqa,arc_easy --limit 200

Scored like lm-evaluation-harness (0-shot, its prompts): LAMBADA greedy match; PIQA, ARC and WinoGrande by
the highest continuation log-likelihood (acc) and, for PIQA and ARC, per character (acc_norm). Task rows come
from $LOWBIT_DATA_DIR/zeroshot/<task>.jsonl, else the Hugging Face hub. The same numbers as `quantize eval acc`.
"""

from __future__ import annotations

import argparse
import json
import sys

import transformers

import lowbit
from lowbit.calibrate.sources import TASKS
from lowbit.errors import LowbitError
from lowbit.quantize.evaluate import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description="Zero-shot accuracy of a model directory, as JSON.")
    parser.add_argument("model", help="model directory: a Hugging Face checkpoint or a lowbit-quantized one")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks (default: all of {','.join(TASKS)})",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows of each task")
    args = parser.parse_args()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        model = lowbit.load(args.model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        result = accuracy(model, tokenizer, tasks, limit=args.limit)
    except LowbitError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
