"""Tile sweep of the W4A16 kernels at decode sizes (M = 1 and 16) on the Llama shapes (GPU only).

    python benchmarks/w4a16_sweep.py [--out benchmarks/results/w4a16_sweep.json] [--m 1,16] [--jobs 14]

For each (N, K) of benchmarks/kernels.py and each M, times torch's fp16 matmul, the launcher's current choice
(``w4a16_triton``) and a list of candidate tile configurations of the GEMV kernel (M = 1: rows per program,
K tile, warps, pipeline stages, register prefetch of the next K tile, how far K is split) and of the split-K
``tl.dot`` kernel (M = 16), with the timing of benchmarks/kernels.py (one CUDA graph of 10 back-to-back calls
on rotating inputs, median of ``--reps`` replays). Every candidate's output is checked once against the torch
reference (``max|y - ref| <= 1e-2 * max|ref|``, the kernel tests' float16 tolerance); a wrong one is reported
as such and never ranked. Writes JSON and prints, per shape and M, the candidates ranked by time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import GROUP, SHAPES, environment, error_text, precompile, run_once, time_ms  # noqa: E402


@dataclass(frozen=True)
class Candidate:
    """One launch configuration. ``path``: "gemv" or "dot"; ``programs_per_sm``: split K until about this many
    programs per SM run; ``no_split_per_sm``: never split when the N tiles alone give this many per SM."""

    path: str
    block_n: int
    block_k: int
    warps: int
    stages: int
    prefetch: bool = False
    programs_per_sm: int = 8
    no_split_per_sm: int = 4

    @property
    def name(self) -> str:
        return (f"{self.path} n{self.block_n} k{self.block_k} w{self.warps} s{self.stages}"
                f"{' pf' if self.prefetch else ''} p{self.programs_per_sm}/{self.no_split_per_sm}")


GEMV = [  # M = 1; (16, 512, 4 warps, 1 stage, 8 / 4 programs per SM) was gemv_config before this sweep
    Candidate("gemv", 16, 512, 4, 1),
    Candidate("gemv", 8, 1024, 4, 1, True, 1, 1),
    Candidate("gemv", 8, 1024, 4, 1, True, 16, 8),
    Candidate("gemv", 8, 1024, 4, 1, True, 4, 2),
    Candidate("gemv", 8, 2048, 4, 1, True),
    Candidate("gemv", 4, 1024, 2, 1, True),
    Candidate("gemv", 4, 2048, 4, 1, True),
    Candidate("gemv", 8, 1024, 8, 1, True),
    Candidate("gemv", 8, 512, 2, 1, True, 1, 1),
    Candidate("gemv", 8, 1024, 4, 2, True),
    Candidate("gemv", 16, 512, 4, 1, True),
    Candidate("gemv", 16, 512, 4, 3),
    Candidate("gemv", 16, 1024, 4, 1),
    Candidate("gemv", 16, 1024, 4, 1, True),
    Candidate("gemv", 32, 512, 4, 1, True),
    Candidate("gemv", 32, 256, 4, 1, True),
    Candidate("gemv", 8, 1024, 4, 1, True),
    Candidate("gemv", 8, 512, 2, 1, True),
    Candidate("gemv", 16, 512, 8, 1, True),
    Candidate("gemv", 64, 256, 8, 1, True),
    Candidate("gemv", 16, 512, 4, 1, True, 16, 8),
    Candidate("gemv", 16, 1024, 4, 1, True, 16, 8),
    Candidate("gemv", 16, 512, 4, 1, True, 4, 2),
    Candidate("gemv", 16, 512, 4, 1, True, 1, 1),  # never split K
]
DOT = [  # M = 16, block_m 16; (64, 128, 4 warps, 4 stages, 6 programs per SM) was gemm_config before this sweep
    Candidate("dot", 64, 128, 4, 4, programs_per_sm=16, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 128, 4, 4, programs_per_sm=24, no_split_per_sm=1 << 30),
    Candidate("dot", 128, 128, 4, 4, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 256, 4, 4, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 128, 4, 3, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 32, 128, 4, 4, programs_per_sm=24, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 128, 4, 4, programs_per_sm=6, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 256, 4, 4, programs_per_sm=6, no_split_per_sm=1 << 30),
    Candidate("dot", 128, 128, 4, 4, programs_per_sm=6, no_split_per_sm=1 << 30),
    Candidate("dot", 32, 256, 4, 4, programs_per_sm=6, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 128, 4, 6, programs_per_sm=6, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 128, 4, 4, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 32, 128, 4, 5, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 64, 256, 4, 3, programs_per_sm=12, no_split_per_sm=1 << 30),
    Candidate("dot", 128, 128, 8, 4, programs_per_sm=8, no_split_per_sm=1 << 30),
    Candidate("dot", 32, 512, 4, 3, programs_per_sm=8, no_split_per_sm=1 << 30),
]


def candidate_fn(c: Candidate, M: int, N: int, K: int):  # type: ignore[no-untyped-def]
    """``fn(x, packed, scale) -> y`` launching the kernel of ``c`` on the GPU."""
    import triton

    from lowbit.kernels import gemm_common, w4a16

    sms = gemm_common._sm_count(torch.device("cuda"))
    block_m = 1 << max(0, (M - 1).bit_length()) if c.path == "gemv" else 16
    n_tiles = triton.cdiv(N, c.block_n)
    split = 1 if n_tiles >= c.no_split_per_sm * sms else gemm_common._split(N, K, c.block_n, c.block_k, c.programs_per_sm * sms)
    cfg = gemm_common.GemmConfig(block_m, c.block_n, c.block_k, split, c.warps, c.stages)
    mode = gemm_common.group_mode(GROUP, c.block_k)

    def fn(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        common = dict(cfg=cfg, GROUP_SIZE=GROUP, GROUP_MODE=mode, HAS_ZERO=False, EVEN_K=gemm_common.even_k(K, cfg))
        args = (packed, scale, scale, K // GROUP, K // 8)
        if c.path == "gemv":
            return gemm_common.launch_gemm(w4a16._w4a16_gemv_kernel, x, N, torch.float16, args, ROUND_W=False,
                                           PREFETCH=c.prefetch, **common)
        return gemm_common.launch_gemm(w4a16._w4a16_kernel, x, N, torch.float16, args, DEQUANT_F16=True, **common)

    return fn, split


def make_args(M: int, N: int, K: int):  # type: ignore[no-untyped-def]
    def make(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(i)
        x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
        packed = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), device="cuda", dtype=torch.int32, generator=g)
        scale = (torch.rand(N, K // GROUP, device="cuda", generator=g) * 0.02 + 0.001).to(torch.float16)
        return x, packed, scale
    return make


def candidates(M: int) -> list[Candidate]:
    return GEMV if M == 1 else DOT


def _compile(task: tuple) -> str | None:
    """Worker of :func:`kernels.precompile`: run candidate ``task = (M, N, K, Candidate)`` once."""
    M, N, K, c = task
    try:
        fn = candidate_fn(c, M, N, K)[0]
    except Exception as e:  # a bad configuration: reported again by the timing process
        return error_text(e)
    return run_once(make_args(M, N, K), fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/w4a16_sweep.json"), help="JSON output file")
    ap.add_argument("--m", default="1,16", help="comma-separated M values (1 sweeps the GEMV, others the tl.dot path)")
    ap.add_argument("--shapes", default="all", help="'all' or comma-separated indices into kernels.SHAPES")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays (median reported)")
    ap.add_argument("--jobs", type=int, default=1, help="processes compiling the candidates in parallel first")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/w4a16_sweep.py needs a CUDA GPU")
    from lowbit.kernels import w4a16

    ms = [int(m) for m in args.m.split(",")]
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    precompile(_compile, [(M, N, K, c) for _, _, N, K in shapes for M in ms for c in candidates(M)], args.jobs)
    rows: list[dict] = []
    for model, layer, N, K in shapes:
        for M in ms:
            make = make_args(M, N, K)
            nbytes = N * K // 2 + N * K // GROUP * 2 + M * K * 2
            fp16 = time_ms(lambda i: (torch.randn(M, K, device="cuda", dtype=torch.float16),
                                      torch.randn(N, K, device="cuda", dtype=torch.float16)),
                           lambda x, w: x @ w.T, N * K * 2, args.warmup, args.reps)
            launcher = time_ms(make, lambda x, p, s: w4a16.w4a16_triton(x, p, s, None, GROUP, torch.float16),
                               nbytes, args.warmup, args.reps)
            base = {"model": model, "layer": layer, "N": N, "K": K, "M": M, "fp16_ms": fp16, "launcher_ms": launcher}
            x, p, s = make(0)
            ref = w4a16.w4a16_reference(x, p, s, None, GROUP, torch.float16).float()
            for c in candidates(M):
                row = {**base, "candidate": c.name, **asdict(c)}
                try:
                    fn, split = candidate_fn(c, M, N, K)
                    err = (fn(x, p, s).float() - ref).abs().max().item() / ref.abs().max().item()
                    row.update(split=split, rel_err=err, ok=err <= 1e-2)
                    row["ms"] = time_ms(make, fn, nbytes, args.warmup, args.reps) if row["ok"] else None
                except Exception as e:
                    row.update(ok=False, ms=None, error=error_text(e))
                row["speedup_vs_fp16"] = fp16 / row["ms"] if row.get("ms") else None
                rows.append(row)
            ranked = sorted((r for r in rows if r["N"] == N and r["K"] == K and r["M"] == M and r["ms"]),
                            key=lambda r: r["ms"])
            print(f"\n{model} {layer} {N}x{K} M={M}: fp16 {fp16 * 1e3:.1f} us, launcher {launcher * 1e3:.1f} us "
                  f"({fp16 / launcher:.2f}x)", flush=True)
            for r in ranked[:6]:
                print(f"  {r['ms'] * 1e3:7.1f} us  {r['speedup_vs_fp16']:.2f}x  split {r['split']:2d}  {r['candidate']}")
            bad = [r["candidate"] + ": " + r.get("error", f"rel err {r.get('rel_err')}") for r in rows
                   if r["N"] == N and r["K"] == K and r["M"] == M and not r["ok"]]
            for b in bad:
                print("  FAILED", b)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"environment": environment(), "group_size": GROUP, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
