"""The floor of a calibration-driven quantizer: one forward pass of the calibration set, block by block.

    LOWBIT_DATA_DIR=../shared/data python benchmarks/calib_floor.py [--model DIR] [--samples 128]

Times, on the same windows lowbit.quantize_model uses: (1) loading the model and building the windows,
(2) the plain block-by-block forward pass (capture block 0's inputs, run each block on all batches), and
(3) the same pass through the staged runner with the X^T X statistics every sub-group collects, which
is what GPTQ needs before it can round anything. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.calibrate.runner import capture_block_inputs, run_block
from lowbit.calibrate.sources import calibration_texts
from lowbit.calibrate.staged import run_block_staged
from lowbit.calibrate.windows import calibration_windows
from lowbit.models.loading import get_module, load_float_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or alias (default smollm2-135m)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward call")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tok, table, _ = load_float_model(args.model)
    windows = calibration_windows(calibration_texts(None), tok, args.samples, args.calib_seqlen, 0)
    t_load = time.perf_counter() - t0
    blocks = get_module(model, table.blocks)

    def one_pass(staged: bool) -> float:
        t = time.perf_counter()
        inputs = capture_block_inputs(model, table, windows, args.batch_size, "cpu")
        for block in blocks:
            if staged:
                inputs.hidden = run_block_staged(block, table, inputs, lambda i, s: s.hessian())
            else:
                inputs.hidden = run_block(block, inputs)
        return time.perf_counter() - t

    with torch.inference_mode():
        forward = one_pass(staged=False)
        with_stats = one_pass(staged=True)
    print(json.dumps({"load_and_windows_s": round(t_load, 1), "forward_pass_s": round(forward, 1),
                      "forward_with_hessians_s": round(with_stats, 1), "samples": args.samples,
                      "seqlen": args.calib_seqlen, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
