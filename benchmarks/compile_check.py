"""Compile every Triton kernel for a real GPU ahead of time, on a machine without one (a check, not a test).

    python benchmarks/compile_check.py [--target cuda:90:32] [--sms 132] [--kernels all|w4a16,fp4,...]

The tests run the kernels under the Triton interpreter, which never lowers them: a kernel the interpreter runs
can still fail to compile (an op or layout the GPU backend rejects, too much shared memory). This script lowers
each kernel through Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas, which the triton wheel ships)
for ``--target`` (default sm_90, H100/H200), with the constexprs, tiles, warps and stages that the launchers in
lowbit/kernels choose on that GPU (``--sms`` streaming multiprocessors; 132 on an H100 SXM or H200) for decode
and prefill token counts on SmolLM2-135M and Llama-2 linear shapes, float16, bfloat16 and float32
activations, and symmetric and asymmetric INT4 groups that hit every ``GROUP_MODE`` (TILE_IN_GROUP,
GROUPS_IN_TILE, GROUP_GATHER) with and without ``EVEN_K``. Runtime arguments are specialized as the JIT does
(an integer 1 is a constant; pointers and multiples of 16 are 16-divisible). Of the launches that differ only
in shape-valued constants (K, K_ITERS, the group size, the number of K splits) the first is compiled.

It prints one line per compiled configuration (kernel, constexprs, warps/stages, shared memory, seconds) and
exits 1 if any failed or needs more shared memory than the target has. Run it once per triton version when
changing the supported range (pyproject.toml). The compile cache goes to a temporary folder, so every run
compiles for real.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

# Compiled kernels, not the interpreter; a fresh compile cache, so a cached success from another version or an
# earlier run proves nothing.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowbit-compile-check-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns while unset; 1 is the default so far

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit.kernels import a8w4, fp_weight, int4_fp8, w4a16, w8a8  # noqa: E402
from lowbit.kernels.gemm_common import even_k, gemm_config, group_mode  # noqa: E402

CUDA = torch.device("cuda")  # only read by the tile heuristics (device.type); nothing is allocated
# Shared memory one block may use, by compute capability (CUDA programming guide, "Technical Specifications").
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# (N, K) of real linears: SmolLM2-135M (q/o, k/v, gate/up, down; K = 576 has no power-of-two group of 128),
# Llama-2-7B (q/k/v/o, gate/up, down) and Llama-2-13B q/k/v/o (K = 5120 takes group 40: GROUP_GATHER).
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008), (5120, 5120)]
M_VALUES = (1, 16, 64, 256)  # decode (GEMV, split-K) and prefill tiles
GROUPS = (32, 64, 128, 40, None)  # None: channel-wise (one group of K); 40: GROUP_GATHER
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The 8-bit kernels' output dtype only changes the final store's cast.
OUT_DTYPES = (torch.float16,)
TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int8: "i8",
    torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv",
}
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Ptr:
    """A pointer argument to a tensor of ``dtype`` (a torch allocation: 16-byte aligned)."""

    dtype: torch.dtype


@dataclass
class Launch:
    """One kernel launch as the launcher would make it: runtime arguments, constexprs, warps and stages."""

    family: str
    kernel: Any
    args: dict[str, Ptr | int]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shape: str = ""


# The JIT's specialization of runtime arguments, mirrored: an integer equal to 1 becomes a constant, pointers
# (torch allocations) and integers divisible by 16 carry that divisibility to the compiler.
def _arg_type(v: Ptr | int) -> str:
    if isinstance(v, Ptr):
        return "*" + TRITON_TYPES[v.dtype]
    return "constexpr" if v == 1 else "i32"


def _divisible(v: Ptr | int) -> bool:
    return isinstance(v, Ptr) or (v != 1 and v % 16 == 0)


def _scale_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Scales are stored in the model dtype for 16-bit models, float16 for float32 ones (README)."""
    return torch.float16 if x_dtype == torch.float32 else x_dtype


def _gemm_meta(cfg: Any, K: int, x_dtype: torch.dtype) -> dict[str, Any]:
    """The constexprs ``gemm_common.launch_gemm`` adds for ``cfg``."""
    k_iters = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k)
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_ITERS=k_iters, SPLIT_K=cfg.split_k,
        DOT_IEEE=x_dtype == torch.float32,
    )


def _y(cfg: Any, out: torch.dtype) -> Ptr:
    return Ptr(torch.float32 if cfg.split_k > 1 else out)


def w4a16_launches() -> Iterator[Launch]:
    """w4a16.w4a16_triton: the GEMV kernel at M <= GEMV_MAX_M, else the tl.dot kernel."""
    for (N, K), M, g, x, zero in itertools.product(SHAPES, M_VALUES, GROUPS, X_DTYPES, (False, True)):
        group = K if g is None else g
        if K % group:
            continue
        s = _scale_dtype(x)
        args = dict(x_ptr=Ptr(x), y_ptr=None, M=M, N=N, K=K, w_ptr=Ptr(torch.int32), s_ptr=Ptr(s),
                    z_ptr=Ptr(torch.int8 if zero else s), n_groups=K // group, KW=K // 8)
        if M <= w4a16.GEMV_MAX_M:
            cfg = w4a16.gemv_config(M, N, K, CUDA, group)
            kernel = w4a16._w4a16_gemv_kernel
            # The output is in x's dtype; float32 x with float16 scales rounds each weight (ROUND_W).
            round_w = x == torch.float32 and s != torch.float32
            extra = dict(ROUND_W=round_w, PREFETCH=w4a16.GEMV_PREFETCH)
        else:
            cfg = gemm_config(M, N, K, CUDA, group, x.itemsize)
            kernel = w4a16._w4a16_kernel
            extra = dict(DEQUANT_F16=x == s == torch.float16)
        args["y_ptr"] = _y(cfg, x)
        meta = dict(GROUP_SIZE=group, GROUP_MODE=group_mode(group, cfg.block_k), HAS_ZERO=zero,
                    EVEN_K=even_k(K, cfg), **extra, **_gemm_meta(cfg, K, x))
        yield Launch("w4a16", kernel, args, meta, cfg.num_warps, cfg.num_stages, f"M={M} N={N} K={K}")


def fp4_launches() -> Iterator[Launch]:
    """fp_weight.fp4_triton: NVFP4 (block 16, E4M3 scales as bytes, float32 global scale) and MXFP4 (block 32)."""
    for (N, K), M, x, block in itertools.product(SHAPES, M_VALUES, X_DTYPES, (16, 32)):
        cfg = fp_weight.fp_gemm_config(M, N, K, CUDA)
        nv = block == 16
        args = dict(x_ptr=Ptr(x), y_ptr=_y(cfg, x), M=M, N=N, K=K, w_ptr=Ptr(torch.uint8), s_ptr=Ptr(torch.uint8),
                    g_ptr=Ptr(torch.float32 if nv else torch.uint8), stride_w=K // 2, stride_s=K // block)
        meta = dict(SCALE_BLOCK=block, NV=nv, EVEN_K=even_k(K, cfg), **_gemm_meta(cfg, K, x))
        yield Launch("nvfp4" if nv else "mxfp4", fp_weight._fp4_kernel, args, meta, cfg.num_warps, cfg.num_stages,
                     f"M={M} N={N} K={K}")


def fp6_launches() -> Iterator[Launch]:
    """fp_weight.fp6_triton: E3M2 and E2M3 weights, one scale per output channel."""
    for (N, K), M, x, fmt in itertools.product(SHAPES, M_VALUES, X_DTYPES, tuple(fp_weight.FP6_FORMATS)):
        f = fp_weight.FP6_FORMATS[fmt]
        cfg = fp_weight.fp_gemm_config(M, N, K, CUDA)
        args = dict(x_ptr=Ptr(x), y_ptr=_y(cfg, x), M=M, N=N, K=K, hi_ptr=Ptr(torch.uint8), lo_ptr=Ptr(torch.uint8),
                    s_ptr=Ptr(_scale_dtype(x)), stride_hi=K // 4, stride_lo=K // 2)
        meta = dict(EBITS=f.ebits, MBITS=f.mbits, BIAS=f.bias, EVEN_K=even_k(K, cfg), **_gemm_meta(cfg, K, x))
        yield Launch(f"fp6-{fmt}", fp_weight._fp6_kernel, args, meta, cfg.num_warps, cfg.num_stages,
                     f"M={M} N={N} K={K}")


def a8w4_launches() -> Iterator[Launch]:
    """a8w4.a8w4_triton (DGQ): INT8 activations x INT4 weights with INT8 group multipliers."""
    for (N, K), M, g, out, zero in itertools.product(SHAPES, M_VALUES, GROUPS, OUT_DTYPES, (False, True)):
        group = K if g is None else g
        if K % group:
            continue
        cfg = w8a8.int4_gemm_config(M, N, K, group, CUDA)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        args = dict(x_ptr=Ptr(torch.int8), xs_ptr=Ptr(torch.float32), p_ptr=Ptr(torch.int32), m_ptr=Ptr(torch.int8),
                    z_ptr=Ptr(torch.int8), s8_ptr=Ptr(torch.float32), y_ptr=Ptr(out), M=M, N=N)
        meta = dict(K=K, GROUP=group, HAS_ZERO=zero, **cfg)
        yield Launch("a8w4", a8w4._a8w4_kernel, args, meta, warps, stages, f"M={M} N={N} K={K}")


def int4_fp8_launches() -> Iterator[Launch]:
    """int4_fp8.int4_fp8_triton (FireQ): FP8 activations x INT4 weights with FP8 group scales, compiled cast."""
    for (N, K), M, g, out in itertools.product(SHAPES, M_VALUES, GROUPS, OUT_DTYPES):
        group = K if g is None else g
        if K % group:
            continue
        cfg = w8a8.int4_gemm_config(M, N, K, group, CUDA)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        args = dict(x_ptr=Ptr(FP8), xs_ptr=Ptr(torch.float32), p_ptr=Ptr(torch.int32), s_ptr=Ptr(FP8),
                    g_ptr=Ptr(torch.float32), y_ptr=Ptr(out), M=M, N=N)
        meta = dict(K=K, GROUP=group, HW_CAST=True, **cfg)
        yield Launch("int4-fp8", int4_fp8._int4_fp8_kernel, args, meta, warps, stages, f"M={M} N={N} K={K}")


def w8a8_launches() -> Iterator[Launch]:
    """w8a8: the per-token activation quantizer (INT8, FP8) and the scaled INT8/FP8 GEMM."""
    ks = sorted({k for _, k in SHAPES})
    for K, x, code in itertools.product(ks, X_DTYPES, (torch.int8, FP8)):
        block = min(triton.next_power_of_2(K), 2048)
        args = dict(x_ptr=Ptr(x), q_ptr=Ptr(code), s_ptr=Ptr(torch.float32))
        meta = dict(K=K, BLOCK=block, IS_FP8=code == FP8)
        yield Launch("quant-per-token", w8a8._quantize_per_token_kernel, args, meta, 4, 3, f"K={K}")
    outs = OUT_DTYPES + (torch.bfloat16,)
    for (N, K), M, out, code in itertools.product(SHAPES, M_VALUES, outs, (torch.int8, FP8)):
        cfg = w8a8.gemm_config(M)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        args = dict(x_ptr=Ptr(code), xs_ptr=Ptr(torch.float32), w_ptr=Ptr(code), ws_ptr=Ptr(torch.float32),
                    y_ptr=Ptr(out), M=M, N=N)
        meta = dict(K=K, IS_INT8=code == torch.int8, **cfg)
        yield Launch("w8a8" if code == torch.int8 else "fp8", w8a8._scaled_mm_kernel, args, meta, warps, stages,
                     f"M={M} N={N} K={K}")


FAMILIES: dict[str, Callable[[], Iterator[Launch]]] = {
    "w4a16": w4a16_launches, "fp4": fp4_launches, "fp6": fp6_launches, "a8w4": a8w4_launches,
    "int4_fp8": int4_fp8_launches, "w8a8": w8a8_launches,
}


def _coverage_key(launch: Launch) -> tuple:
    """Launches that differ only in shape-valued constexprs (K, K_ITERS, the group size, how many ways K is
    split) lower to the same code up to constants: compile the first of them."""
    meta = {k: v for k, v in launch.constexprs.items() if k not in ("K", "K_ITERS", "GROUP", "GROUP_SIZE")}
    if "SPLIT_K" in meta:
        meta["SPLIT_K"] = meta["SPLIT_K"] > 1
    types = tuple(_arg_type(v) for v in launch.args.values())
    return (launch.kernel.__name__, types, tuple(sorted(meta.items())), launch.num_warps, launch.num_stages)


def compile_launch(launch: Launch, target: GPUTarget) -> Any:
    """``triton.compile`` the launch for ``target``, as the JIT would on a GPU of that kind."""
    kernel = launch.kernel
    constexprs = {**launch.constexprs, **{n: 1 for n, v in launch.args.items() if _arg_type(v) == "constexpr"}}
    signature = {n: _arg_type(v) for n, v in launch.args.items()}
    signature.update({n: "constexpr" for n in constexprs})
    signature = {n: signature[n] for n in kernel.arg_names}  # the kernel's argument order
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, v in launch.args.items() if _divisible(v)}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def _describe(launch: Launch) -> str:
    types = ",".join(_arg_type(v).lstrip("*") for v in launch.args.values() if isinstance(v, Ptr))
    meta = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.constexprs.items())
    name = launch.kernel.__name__
    return f"{launch.family} {name} [{types}] {meta} warps={launch.num_warps} stages={launch.num_stages}"


# Filled by main before the worker processes fork, so a worker gets an index, not a pickled kernel.
_LAUNCHES: list[Launch] = []
_TARGET: GPUTarget | None = None


def _compile_one(i: int) -> tuple[bool, int, str, float]:
    """Compile ``_LAUNCHES[i]``: ``(ok, shared memory bytes, error, seconds)``."""
    t0 = time.perf_counter()
    try:
        cc = compile_launch(_LAUNCHES[i], _TARGET)
    except Exception as e:  # noqa: BLE001 - every failing configuration is reported, then the exit code says it
        lines = str(e).strip().splitlines() or [""]
        detail = traceback.format_exc() if os.environ.get("LOWBIT_COMPILE_CHECK_TRACEBACK") else ""
        return False, 0, f"{type(e).__name__}: {lines[0]}{detail and chr(10) + detail}", time.perf_counter() - t0
    return True, cc.metadata.shared, "", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    global _TARGET
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="cuda:90:32", help="backend:arch:warp_size (default H100/H200: cuda:90:32)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the tile heuristics see (default 132)")
    parser.add_argument("--kernels", default="all", help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    args = parser.parse_args(argv)
    backend, arch, warp = args.target.split(":")
    _TARGET = GPUTarget(backend, int(arch), int(warp))
    max_shared = MAX_SHARED.get(int(arch))
    names = list(FAMILIES) if args.kernels == "all" else args.kernels.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown kernels {unknown}; valid: {', '.join(FAMILIES)}")
    # The tile heuristics ask torch for the SM count (gemm_common._sm_count); there is no GPU to ask.
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=args.sms)

    seen: set[tuple] = set()
    for name in names:
        for launch in FAMILIES[name]():
            if _coverage_key(launch) not in seen:
                seen.add(_coverage_key(launch))
                _LAUNCHES.append(launch)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {_TARGET}, {args.sms} SMs, "
          f"{len(_LAUNCHES)} configurations", flush=True)
    t_all = time.perf_counter()
    if args.jobs > 1:
        pool = multiprocessing.get_context("fork").Pool(args.jobs)
        results = pool.imap(_compile_one, range(len(_LAUNCHES)))
    else:
        pool, results = None, map(_compile_one, range(len(_LAUNCHES)))
    failures = 0
    for launch, (ok, shared, error, seconds) in zip(_LAUNCHES, results):
        if ok and max_shared is not None and shared > max_shared:
            ok, error = False, f"needs {shared} bytes of shared memory, the target has {max_shared}"
        failures += not ok
        outcome = f"shared={shared} {seconds:.1f}s" if ok else f"({launch.shape}) {error}"
        print(f"{'ok  ' if ok else 'FAIL'} {_describe(launch)} {outcome}", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    print(f"{len(_LAUNCHES)} configurations, {len(_LAUNCHES) - failures} ok, {failures} failed, "
          f"{time.perf_counter() - t_all:.0f} s (triton {triton.__version__}, {_TARGET})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
