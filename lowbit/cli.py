"""The `quantize` command: a thin typer front over the public functions.

Every command turns a LowbitError (bad input) into one readable line and a non-zero exit; with
``--debug`` the traceback is shown instead.
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training quantization of LLMs to compressed-tensors checkpoints.")
eval_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check a float or quantized model: perplexity and zero-shot accuracy.")
app.add_typer(eval_app, name="eval")

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Local Hugging Face model directory, a lowbit output directory, or the alias smollm2-135m (default)."),
]


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a command, printing user errors as one line (exit 2), other failures as one line (exit 1)."""

    @wraps(fn)
    def run(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except LowbitError as e:
            if debug:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # a bug or an unexpected environment problem: still one line unless --debug
            if debug:
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            typer.echo(f"error: {type(e).__name__}: {msg} (run with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return run


@app.command("model")
def model_cmd(
    model: ModelArg = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Preset name (see `quantize recipes`) or a .json/.yaml recipe file.")] = "w4a16",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory, written atomically: a failed or killed run never leaves a partial OUT; its finished blocks stay in a staging directory beside it for --resume, and a run without --resume removes them.")] = Path("out/quantized"),
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text: .txt, .json list of strings, .jsonl with a 'text' field, or a datasets dataset saved to disk. Default: $LOWBIT_DATA_DIR/calib/wikipedia.txt, else wikitext-2 train.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Number of calibration windows (>= 1).")] = 128,
    calib_seqlen: Annotated[int, typer.Option("--calib-seqlen", help="Tokens per calibration window (2 .. the model's max_position_embeddings).")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed for window sampling and torch.")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where each block is processed and learned transforms and trained rounding (disc, lrqat) train: cpu or cuda (on cuda, ost, affine, disc and lrqat take the papers' step counts and window sizes; on cpu, settings that fit 2 cores: docs/RECIPES.md).")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists and is an empty directory or a previous lowbit output (never the model directory, a directory containing it, your home directory or /).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration windows per forward call (>= 1).")] = 8,
    avg_bits: Annotated[Optional[float], typer.Option("--avg-bits", help="Average bits per weight (scales counted) for a BAQ recipe such as baq-3.5; overrides its budget.")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weight file (e.g. 5GB, 500MB, 2GiB; GB = 10^9 bytes as in transformers): a larger checkpoint is written as model-0000N-of-0000M.safetensors shards with model.safetensors.index.json.")] = "50GB",  # formats/shards.py DEFAULT_MAX_SHARD_SIZE (not imported: --help stays fast)
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted (killed) run of this same command from its last finished block: the output is byte-identical to an uninterrupted run. Without it, a new run removes such leftovers.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes to split the calibration batches and the rounding among (>= 1): starts torchrun with gloo on the CPU, or NCCL with one GPU per process for --device cuda; the same as `torchrun --nproc-per-node N $(which quantize) model ...`.")] = 1,
    port: Annotated[Optional[int], typer.Option("--port", help="With --nproc > 1: the localhost port the processes meet on (default: a free one).")] = None,
    calib_dtype: Annotated[str, typer.Option("--calib-dtype", help="Dtype of the calibration forward passes: float32, or bfloat16 (faster on CPUs with AVX-512 BF16 and on GPUs; Hessians and rounding stay float32).")] = "float32",
    debug: Debug = False,
) -> None:
    """Quantize MODEL with a recipe and write a compressed-tensors checkpoint to --out."""
    from lowbit.quantize.report import print_summary
    from lowbit.quantize.pipeline import quantize_model

    def go() -> None:
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise LowbitError(f"unknown device {device!r}; valid: cpu, cuda")
        if nproc < 1:
            raise LowbitError(f"--nproc must be >= 1, got {nproc}")
        if nproc > 1:
            from lowbit.distributed import launch

            raise typer.Exit(launch(nproc, port, _without_launch_options(sys.argv[1:])))
        result = quantize_model(model, recipe, out, calib, samples, calib_seqlen, seed, device, overwrite, batch_size,
                                avg_bits=avg_bits, max_shard_size=max_shard_size, resume=resume, calib_dtype=calib_dtype)
        if int(os.environ.get("RANK", "0")) == 0:
            print_summary(result)

    guarded(go)(debug=debug)


def _without_launch_options(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` and ``--port P`` (``--nproc=N`` forms too): what each torchrun process gets."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--port"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--port=")):
            continue
        kept.append(a)
    return kept


@app.command("recipes")
def recipes_cmd() -> None:
    """List the preset recipes, one line each, then the transforms a recipe can list (``transforms: [...]``)."""
    from lowbit.quantize.recipe import PRESETS
    from lowbit.quantize.transforms import TRANSFORMS

    width = max(len(n) for n in PRESETS)
    for name, r in PRESETS.items():
        typer.echo(f"{name:<{width}}  {r.method:<5}  {r.description}")
    typer.echo("\ntransforms (a recipe's `transforms:` list, applied in order before rounding):")
    for name, t in TRANSFORMS.items():
        opts = f" [options: {', '.join(t.options)}]" if t.options else ""
        typer.echo(f"  {name:<12} {t.level:<5}  {t.description}{opts}")


@app.command("inspect")
def inspect_cmd(
    directory: Annotated[Path, typer.Argument(help="A directory written by `quantize model`.")],
    as_json: AsJson = False,
    top: Annotated[int, typer.Option("--top", help="How many worst layers to list.")] = 10,
    debug: Debug = False,
) -> None:
    """Show a quantized checkpoint: schemes, bits per weight, sizes, group fallbacks, worst layers."""
    from lowbit.quantize.report import inspect_dir, print_inspect

    def go() -> None:
        info = inspect_dir(directory)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        else:
            print_inspect(info, top)

    guarded(go)(debug=debug)


EvalDevice = Annotated[str, typer.Option("--device", help="Where the model runs: cpu or cuda.")]
EvalBackend = Annotated[str, typer.Option("--backend", help="Quantized GEMMs: auto (Triton kernels where measured faster than fp16, else the fp16 path), triton (always the kernels; CUDA), torch (the reference).")]


def _load_for_eval(model: Optional[str], device: str = "cpu", backend: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from lowbit.models.loading import resolve_model_dir
    from lowbit.models.quantized import load

    path = resolve_model_dir(model)
    return load(path, device=device, backend=backend), AutoTokenizer.from_pretrained(path)


@eval_app.command("ppl")
def ppl_cmd(
    model: ModelArg = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per non-overlapping window.")] = 2048,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N windows.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="WikiText-2 test rows (.json list) or raw text (.txt). Default: $LOWBIT_DATA_DIR/wikitext-2/test_rows.json, else the datasets hub.")] = None,
    device: EvalDevice = "cpu",
    backend: EvalBackend = "auto",
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Perplexity on WikiText-2 raw test (rows joined with blank lines, non-overlapping windows)."""

    def go() -> None:
        from lowbit.calibrate.sources import wikitext2_test_text
        from lowbit.quantize.evaluate import perplexity

        text = wikitext2_test_text(data)
        m, tok = _load_for_eval(model, device, backend)
        res = perplexity(m, tok, text, seqlen=seqlen, limit=limit, progress=True)
        if as_json:
            typer.echo(json.dumps(res))
        else:
            typer.echo(f"ppl {res['ppl']:.4f}  (seqlen {res['seqlen']}, {res['windows']} windows)")

    guarded(go)(debug=debug)


@eval_app.command("acc")
def acc_cmd(
    model: ModelArg = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: lambada_openai, piqa, winogrande, arc_easy, arc_challenge.")] = "lambada_openai,piqa,winogrande,arc_easy,arc_challenge",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N rows of each task.")] = None,
    device: EvalDevice = "cpu",
    backend: EvalBackend = "auto",
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Zero-shot accuracy scored as lm-evaluation-harness does (task files from $LOWBIT_DATA_DIR/zeroshot when set)."""

    def go() -> None:
        from lowbit.quantize.evaluate import accuracy

        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        m, tok = _load_for_eval(model, device, backend)
        res = accuracy(m, tok, task_list, limit=limit, progress=True)
        if as_json:
            typer.echo(json.dumps(res))
        else:
            for task, r in res.items():
                norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}"
                typer.echo(f"{task:<15} acc {r['acc']:.4f}{norm}  (n={r['n']})")

    guarded(go)(debug=debug)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
