"""Does a checkpoint load unchanged in transformers + compressed-tensors, with the logits lowbit.load gives?

    python benchmarks/hf_logits.py out/w3a16-disc [--windows 2 --seqlen 256]

Loads the directory twice (``lowbit.load`` and ``AutoModelForCausalLM.from_pretrained``, no remote code), runs the
same random token windows (seed 0) through both and prints one JSON line: the largest absolute and relative logit
difference and whether they agree within 1e-4 (the tests' tolerance is 1e-5 on stories260K).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the `kernels` package that
# transformers imports: drop it (as benchmarks/transforms.py does).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import lowbit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a quantized checkpoint directory")
    ap.add_argument("--windows", type=int, default=2, help="random token windows")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    args = ap.parse_args()
    ours = lowbit.load(args.checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    vocab = int(theirs.config.vocab_size)
    ids = torch.randint(0, vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    diff = float((a - b).abs().max())
    rel = float((a - b).norm() / b.norm())
    print(json.dumps({"checkpoint": str(args.checkpoint), "max_abs_diff": diff, "rel_diff": rel,
                      "agree_1e-4": diff <= 1e-4 * max(1.0, float(b.abs().max()))}))


if __name__ == "__main__":
    main()
