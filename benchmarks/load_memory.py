"""Peak memory of ``lowbit.load`` against the checkpoint's size (issue 17: target ratio <= 1.2).

    python benchmarks/load_memory.py out/smollm2-w4a16

Three child processes, one after another: a baseline that only imports torch, transformers and lowbit; one that
runs ``lowbit.load(<checkpoint>)``; one that loads and then reads every page of every parameter and buffer
(safetensors tensors may stay file-backed until read, and RSS counts a page only once it is read: this is the
memory the loaded model really takes). Each peak is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after the
child exits. What loading costs is a peak minus the baseline, set against the bytes of the checkpoint's
safetensors files (one file or every shard, formats/checkpoint.py ``weights_size``); the JSON line's ``ratio`` is
the every-page-read one. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the `kernels` package that
# transformers imports: drop it (as benchmarks/hf_logits.py does).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lowbit.formats.checkpoint import weights_size  # noqa: E402

IMPORTS = "import torch, transformers, lowbit, lowbit.models.quantized"
LOAD = IMPORTS + "\nmodel = lowbit.load({path!r})"
# Tensors read from safetensors may stay backed by the file's pages until first read, which RSS counts only then:
# read one byte of every 4 KiB page of every parameter and buffer, so the peak covers the whole loaded model.
TOUCH = LOAD + """
for t in list(model.parameters()) + list(model.buffers()):
    t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
"""
MIB = 1024 * 1024


def child_peak_bytes(code: str) -> int:
    """Peak RSS in bytes of a fresh Python child running ``code``: ru_maxrss of RUSAGE_CHILDREN (KiB on Linux), the
    largest over all waited-for children, so the callers run children in increasing order of what they do."""
    subprocess.run([sys.executable, "-c", code], check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a lowbit checkpoint (or float HF) directory")
    args = ap.parse_args()
    size = weights_size(args.checkpoint)
    # Each child does what the one before did and more, so each peak is at least the one before.
    base = child_peak_bytes(IMPORTS)
    load = child_peak_bytes(LOAD.format(path=str(args.checkpoint)))
    touched = child_peak_bytes(TOUCH.format(path=str(args.checkpoint)))
    print(f"checkpoint                        {args.checkpoint}")
    print(f"weights                           {size / MIB:.1f} MiB")
    print(f"baseline peak (imports)           {base / MIB:.1f} MiB")
    for what, peak in (("load", load), ("load, every page read", touched)):
        print(f"{what + ' - baseline':<34}{(peak - base) / MIB:.1f} MiB = {(peak - base) / size:.2f}x the weights")
    print(json.dumps({"checkpoint": str(args.checkpoint), "weights_bytes": size, "baseline_peak_bytes": base,
                      "load_peak_bytes": load, "touched_peak_bytes": touched,
                      "ratio": round((touched - base) / size, 3)}))


if __name__ == "__main__":
    main()
