"""Time every Triton GEMM against the fp16 / bf16 matmul of the same shape (GPU only).

    python benchmarks/kernels.py [--out benchmarks/results/kernels.json] [--m 1,16,64,256,1024,4096]
                                 [--shapes all|0,2] [--kernels all|w4a16,nvfp4] [--reps 30] [--no-graphs]

For each M and each (N, K) of Llama-2-7B and Llama-3-8B linears, each kernel's time per call is the median
over ``--reps`` CUDA-event timings of 10 back-to-back calls (one CUDA graph replay) after ``--warmup`` calls;
the inputs rotate over enough independent copies (activations and weights) that together they exceed twice
the L2 cache, so no call finds its operands cached by the previous one. A8 kernels are timed twice: the GEMM alone on
pre-quantized activations, and the whole layer (the fused per-token quantization kernel + the GEMM).
Writes JSON (with the GPU, driver, torch and triton versions) and prints a markdown table of times and
speedups over torch fp16 (``x @ w.T`` with ``w`` fp16 ``[N, K]``).

Inputs are random codes in the stored layouts of docs/KERNELS.md: timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (model, layer, N, K): N = out_features, K = in_features.
SHAPES = [
    ("llama-2-7b", "q/k/v/o", 4096, 4096),
    ("llama-2-7b", "gate/up", 11008, 4096),
    ("llama-2-7b", "down", 4096, 11008),
    ("llama-3-8b", "k/v", 1024, 4096),
    ("llama-3-8b", "gate/up", 14336, 4096),
    ("llama-3-8b", "down", 4096, 14336),
]
M_VALUES = (1, 16, 64, 256, 1024, 4096)
GROUP = 128
INNER = 10  # calls between two CUDA events (rounded up to a multiple covering every argument set)
MAX_SETS = 64  # argument sets rotated (2.1 MB INT4 weights at 1024 x 4096: 58 sets exceed twice a 60 MB L2)


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def time_ms(
    make_args: Callable[[int], tuple], fn: Callable, bytes_per_set: int, warmup: int, reps: int, graphs: bool = True
) -> float:
    """Median milliseconds per call of ``fn(*args)``: ``reps`` timings of at least INNER back-to-back calls each.

    The argument sets rotate (together over twice the L2 cache, every set used once per timing). With
    ``graphs`` the calls are captured
    (after the warm-up, which compiles the kernels) into one CUDA graph, and each timing is one replay of it:
    the calls run back to back on the GPU with no host launch between them, as a decoding runtime (vLLM,
    TensorRT-LLM) replays a whole forward pass as one graph. (Replaying one graph per call instead adds the
    host's graph launch, about 5-8 us on the H200's host, to every call shorter than that: it hid the kernels'
    differences at M <= 16 on the smaller shapes.) Without ``graphs`` each call is launched from Python.
    """
    sets = max(1, min(MAX_SETS, math.ceil(2 * _l2_bytes() / max(bytes_per_set, 1))))
    args = [make_args(i) for i in range(sets)]
    for i in range(warmup):
        fn(*args[i % sets])
    torch.cuda.synchronize()
    # Every set once per replay, in a multiple of INNER calls: a graph of only INNER calls would reuse
    # INNER sets, which for small weights fit in the L2 cache together.
    n_calls = INNER * math.ceil(sets / INNER)
    order = [args[j % sets] for j in range(n_calls)]
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for a in order:
                fn(*a)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for a in order:
                fn(*a)
        run: Callable[[], object] = graph.replay
    else:
        def run() -> None:
            for a in order:
                fn(*a)
    run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / n_calls


def precompile(worker: Callable[[tuple], str | None], tasks: list[tuple], jobs: int) -> dict[tuple, str | None]:
    """Run ``worker(task)`` once per task in ``jobs`` spawned processes, to compile the Triton kernels in parallel.

    Each worker launches its kernel once, which writes the compiled binary to Triton's on-disk cache; the
    timing process then loads it from there instead of compiling one kernel after another (a few seconds each,
    hundreds of (kernel, shape, M) variants). Returns ``{task: error or None}``; with ``jobs <= 1`` nothing runs.
    """
    if jobs <= 1 or not tasks:
        return {}
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return dict(zip(tasks, pool.map(worker, tasks, chunksize=1)))


def error_text(e: Exception) -> str:
    """One line for a kernel that failed to compile or launch (it is reported, not fatal)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def run_once(make_args: Callable[[int], tuple], fn: Callable) -> str | None:
    """Call ``fn`` on argument set 0 and wait for it (compiling its kernels); the error text or None."""
    try:
        fn(*make_args(0))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported again (and timed as a failure) by the timing process
        return error_text(e)


def _compile_one(task: tuple) -> str | None:
    """Worker of :func:`precompile` for ``(M, N, K, kernel name)``."""
    M, N, K, name = task
    make, fn, _ = kernels(M, N, K, "cuda")[name]
    return run_once(make, fn)


def kernels(M: int, N: int, K: int, dev: str) -> dict[str, tuple[Callable[[int], tuple], Callable, int]]:
    """name -> (make_args(seed), fn, bytes of one argument set)."""
    from lowbit.kernels import a8w4, fp_weight, int4_fp8, w4a16, w8a8

    G = K // GROUP
    f16, bf16 = torch.float16, torch.bfloat16

    def x16(i: int, dtype: torch.dtype = f16) -> torch.Tensor:
        return torch.randn(M, K, device=dev, dtype=dtype)

    def packed4(i: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, (N, K // 8), device=dev, dtype=torch.int32)

    def xq8(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8), torch.rand(M, 1, device=dev) + 0.5

    def xqf8(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(M, K, device=dev) * 50).to(torch.float8_e4m3fn), torch.rand(M, 1, device=dev) + 0.5

    def fp8_scales(rows: int, cols: int) -> torch.Tensor:
        return (torch.rand(rows, cols, device=dev) + 0.5).to(torch.float8_e4m3fn)

    def u8(shape: tuple[int, int]) -> torch.Tensor:
        return torch.randint(0, 256, shape, device=dev, dtype=torch.uint8)

    w16_bytes, x_bytes = N * K * 2, M * K * 2
    k = {
        "torch fp16": (lambda i: (x16(i), torch.randn(N, K, device=dev, dtype=f16)), lambda x, w: x @ w.T, w16_bytes + x_bytes),
        "torch bf16": (lambda i: (x16(i, bf16), torch.randn(N, K, device=dev, dtype=bf16)), lambda x, w: x @ w.T, w16_bytes + x_bytes),
        "w4a16": (
            lambda i: (x16(i), packed4(i), torch.rand(N, G, device=dev, dtype=f16), None, GROUP),
            lambda x, p, s, z, g: w4a16.w4a16_triton(x, p, s, z, g, out_dtype=f16),
            N * K // 2 + x_bytes,
        ),
        "nvfp4": (
            lambda i: (x16(i), u8((N, K // 2)), fp8_scales(N, K // 16), torch.ones(1, device=dev), 16),
            lambda x, p, s, g, b: fp_weight.fp4_triton(x, p, s, g, b, out_dtype=f16),
            N * K // 2 + N * K // 16 + x_bytes,
        ),
        "mxfp4": (
            lambda i: (x16(i), u8((N, K // 2)), torch.randint(120, 130, (N, K // 32), device=dev, dtype=torch.uint8), None, 32),
            lambda x, p, s, g, b: fp_weight.fp4_triton(x, p, s, g, b, out_dtype=f16),
            N * K // 2 + N * K // 32 + x_bytes,
        ),
        "fp6": (
            lambda i: (x16(i), u8((N, K // 4)), u8((N, K // 2)), torch.rand(N, 1, device=dev, dtype=f16), "e3m2"),
            lambda x, h, l, s, f: fp_weight.fp6_triton(x, h, l, s, f, out_dtype=f16),
            N * K * 3 // 4 + x_bytes,
        ),
        "w8a8 int8 gemm": (
            lambda i: (*xq8(i), torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8), torch.rand(N, 1, device=dev)),
            lambda xq, xs, w, ws: w8a8.scaled_mm_triton(xq, xs, w, ws, out_dtype=f16),
            N * K + M * K,
        ),
        "w8a8 int8 layer": (
            lambda i: (x16(i), torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8), torch.rand(N, 1, device=dev)),
            lambda x, w, ws: w8a8.scaled_mm_triton(*w8a8.quantize_per_token_int8_triton(x), w, ws, out_dtype=f16),
            N * K + x_bytes,
        ),
        "w8a8 fp8 gemm": (
            lambda i: (*xqf8(i), (torch.randn(N, K, device=dev) * 50).to(torch.float8_e4m3fn), torch.rand(N, 1, device=dev)),
            lambda xq, xs, w, ws: w8a8.scaled_mm_triton(xq, xs, w, ws, out_dtype=f16),
            N * K + M * K,
        ),
        "w8a8 fp8 layer": (
            lambda i: (x16(i), (torch.randn(N, K, device=dev) * 50).to(torch.float8_e4m3fn), torch.rand(N, 1, device=dev)),
            lambda x, w, ws: w8a8.scaled_mm_triton(*w8a8.quantize_per_token_fp8_triton(x), w, ws, out_dtype=f16),
            N * K + x_bytes,
        ),
        "a8w4 gemm": (
            lambda i: (*xq8(i), packed4(i), torch.randint(1, 16, (N, G), device=dev, dtype=torch.int8), None,
                       torch.rand(N, 1, device=dev), GROUP),
            lambda xq, xs, p, m, z, s8, g: a8w4.a8w4_triton(xq, xs, p, m, z, s8, g, out_dtype=f16),
            N * K // 2 + M * K,
        ),
        "a8w4 layer": (
            lambda i: (x16(i), packed4(i), torch.randint(1, 16, (N, G), device=dev, dtype=torch.int8), None,
                       torch.rand(N, 1, device=dev), GROUP),
            lambda x, p, m, z, s8, g: a8w4.a8w4_triton(*w8a8.quantize_per_token_int8_triton(x), p, m, z, s8, g, out_dtype=f16),
            N * K // 2 + x_bytes,
        ),
        "int4xfp8 gemm": (
            lambda i: (*xqf8(i), packed4(i), fp8_scales(N, G), torch.ones(1, device=dev), GROUP),
            lambda xq, xs, p, s, g, gs: int4_fp8.int4_fp8_triton(xq, xs, p, s, g, gs, out_dtype=f16),
            N * K // 2 + M * K,
        ),
        "int4xfp8 layer": (
            lambda i: (x16(i), packed4(i), fp8_scales(N, G), torch.ones(1, device=dev), GROUP),
            lambda x, p, s, g, gs: int4_fp8.int4_fp8_triton(*w8a8.quantize_per_token_fp8_triton(x), p, s, g, gs, out_dtype=f16),
            N * K // 2 + x_bytes,
        ),
    }
    return k


def environment() -> dict[str, str]:
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"gpu": torch.cuda.get_device_name(0), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": str(torch.version.cuda)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"), help="JSON output file")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated M values")
    ap.add_argument("--shapes", default="all", help="'all' or comma-separated indices into SHAPES")
    ap.add_argument("--kernels", default="all", help="'all' or comma-separated kernel names")
    ap.add_argument("--warmup", type=int, default=5, help="untimed launches before timing")
    ap.add_argument("--reps", type=int, default=30, help="timed groups of 10 calls (median reported)")
    ap.add_argument("--no-graphs", action="store_true", help="launch from Python instead of replaying CUDA graphs")
    ap.add_argument("--jobs", type=int, default=1, help="processes compiling the kernels in parallel first (1: none)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the kernels are tested on the CPU under TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    ms = [int(m) for m in args.m.split(",")]
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows: list[dict] = []
    result: dict = {"rows": rows}
    names_of = lambda M, N, K: [n for n in kernels(M, N, K, "meta") if args.kernels == "all" or n in args.kernels.split(",")]
    tasks = [(M, N, K, n) for _, _, N, K in shapes for M in ms for n in names_of(M, N, K) if not n.startswith("torch")]
    precompile(_compile_one, tasks, args.jobs)
    for model, layer, N, K in shapes:
        for M in ms:
            ks = kernels(M, N, K, "cuda")
            names = list(ks) if args.kernels == "all" else ["torch fp16"] + [n for n in args.kernels.split(",") if n in ks]
            for name in names:
                make, fn, nbytes = ks[name]
                try:
                    t = time_ms(make, fn, nbytes, args.warmup, args.reps, graphs=not args.no_graphs)
                    err = None
                except Exception as e:  # a kernel that fails to compile or launch is reported, not fatal
                    t, err = float("nan"), error_text(e)
                rows.append({"model": model, "layer": layer, "N": N, "K": K, "M": M, "kernel": name, "ms": t, "error": err})
                print(f"{model} {layer} N={N} K={K} M={M} {name}: {t:.4f} ms" + (f" ({err})" if err else ""), flush=True)
                torch.cuda.empty_cache()
        result = save(rows, args)  # after every shape: a run stopped at its time limit keeps what it measured
    print(table(result))
    print("\nFASTER_THAN_FP16 (lowbit/kernels/triton_gemms.py):", dispatch_table(result))


# benchmark rows -> the dispatch kind of lowbit/kernels/triton_gemms.py (whole layers for the A8 kernels)
DISPATCH_KIND = {"w4a16": "w4a16", "nvfp4": "fp4", "mxfp4": "fp4", "fp6": "fp6", "w8a8 int8 layer": "w8a8_int8",
                 "w8a8 fp8 layer": "w8a8_fp8", "a8w4 layer": "a8w4", "int4xfp8 layer": "int4_fp8"}


def dispatch_table(result: dict) -> dict[str, list[int]]:
    """Per dispatch kind, the M values at which every kernel of that kind beat fp16 on every shape."""
    won: dict[str, set[int]] = {}
    lost: dict[str, set[int]] = {}
    for r in result["rows"]:
        kind = DISPATCH_KIND.get(r["kernel"])
        if kind is None:
            continue
        ok = r["speedup_vs_fp16"] is not None and r["speedup_vs_fp16"] >= 1.0
        (won if ok else lost).setdefault(kind, set()).add(r["M"])
    return {k: sorted(won.get(k, set()) - lost.get(k, set())) for k in sorted(set(won) | set(lost))}


def save(rows: list[dict], args: argparse.Namespace) -> dict:
    """Add speedups over torch fp16 and write the JSON file."""
    base = {(r["N"], r["K"], r["M"]): r["ms"] for r in rows if r["kernel"] == "torch fp16"}
    for r in rows:
        b = base.get((r["N"], r["K"], r["M"]))
        r["speedup_vs_fp16"] = b / r["ms"] if b is not None and r["ms"] == r["ms"] and r["ms"] > 0 else None
    result = {"environment": environment(), "group_size": GROUP, "warmup": args.warmup, "reps": args.reps,
              "inner": INNER, "cuda_graphs": not args.no_graphs, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    """Markdown: one row per (shape, M), one column per kernel, 'ms (x speedup)'."""
    rows = result["rows"]
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["| model | layer | N x K | M | " + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    keys = list(dict.fromkeys((r["model"], r["layer"], r["N"], r["K"], r["M"]) for r in rows))
    for key in keys:
        cells = []
        for n in names:
            r = next((r for r in rows if (r["model"], r["layer"], r["N"], r["K"], r["M"]) == key and r["kernel"] == n), None)
            if r is None or r["ms"] != r["ms"]:
                cells.append("fail" if r is not None else "")
            else:
                cells.append(f"{r['ms']:.3f} ({r['speedup_vs_fp16']:.2f}x)")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} x {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
