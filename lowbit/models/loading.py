"""Loading a float causal LM from a local Hugging Face directory, checked before anything heavy runs.

A model argument is either the alias ``smollm2-135m`` (or None), which means the bundled default model
(:mod:`lowbit.models.smollm2`), or a local directory in Hugging Face layout. Hub ids are not resolved:
lowbit runs offline. Weights are read from safetensors only; pickle checkpoints (``pytorch_model.bin``)
are refused because unpickling can run arbitrary code.

:func:`check_model_dir` does every cheap validation (config JSON, a known architecture, readable
safetensors headers) so that a bad directory fails in milliseconds with one line, not after a multi-GB
load with a transformers traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.arch import ArchTable, arch_table
from lowbit.models.smollm2 import SMOLLM2_ALIAS, materialize_smollm2, smollm2_dir

if TYPE_CHECKING:  # transformers takes seconds to import; only load_float_model needs it at runtime
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _one_line(exc: BaseException) -> str:
    """An exception message collapsed to one line (transformers messages often span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``root`` at the dotted ``path`` (``""`` is ``root`` itself).

    Example: ``get_module(model, "model.layers.3.self_attn.q_proj")``. Numeric parts index a
    ``ModuleList`` the same way attribute names do, since both live in ``_modules``.
    """
    module = root
    walked: list[str] = []
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            where = ".".join(walked) or type(root).__name__
            raise LowbitError(f"module path {path!r} not found: {where} has no submodule {part!r}")
        module = child
        walked.append(part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the existing submodule of ``root`` at the dotted ``path`` with ``new``.

    Only existing paths can be replaced, so a typo cannot silently add an unused module.
    """
    if not path:
        raise LowbitError("set_module needs a non-empty module path; the root module cannot be replaced")
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path)
    if parent._modules.get(name) is None:
        where = parent_path or type(root).__name__
        raise LowbitError(f"module path {path!r} not found: {where} has no submodule {name!r}")
    setattr(parent, name, new)


def _is_default(model: str | Path | None) -> bool:
    return model is None or (isinstance(model, str) and model.strip().lower() == SMOLLM2_ALIAS)


def model_path(model: str | Path | None) -> Path:
    """The directory a model argument names, without checking or creating it (the default model's cache
    directory, converted or not): what a run must not write over."""
    return smollm2_dir() if _is_default(model) else Path(model).expanduser()  # type: ignore[arg-type]


def resolve_model_dir(model: str | Path | None) -> Path:
    """Turn a model argument into a local Hugging Face directory.

    Args:
        model: None or ``"smollm2-135m"`` for the bundled default (materialised on first use), or the
            path of a local directory holding ``config.json``.

    Raises:
        LowbitError: the path does not exist, is not a directory, or has no config.json.
    """
    if _is_default(model):
        return materialize_smollm2()
    path = Path(model).expanduser()
    if not path.exists():
        raise LowbitError(
            f"model {str(model)!r} is not a local directory (hub ids cannot be downloaded offline); "
            f"pass a Hugging Face model directory or the alias {SMOLLM2_ALIAS!r}"
        )
    if not path.is_dir():
        hint = " (GGUF files are read only for the bundled default model)" if path.suffix == ".gguf" else ""
        raise LowbitError(f"model {str(model)!r} is a file, not a model directory{hint}")
    if not (path / "config.json").is_file():
        raise LowbitError(f"model directory {str(path)!r} has no config.json")
    return path.resolve()


def _read_config(path: Path) -> dict[str, Any]:
    """Parse ``path/config.json`` into a dict, or raise a one-line LowbitError."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"model directory {str(path)!r} has no config.json") from None
    except OSError as exc:
        raise LowbitError(f"cannot read {config_file}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{config_file} is not valid JSON: {_one_line(exc)}") from exc
    if not isinstance(config, dict):
        raise LowbitError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    return config


def _check_index(path: Path) -> None:
    """If the checkpoint is sharded, every shard its index names must be present."""
    index_file = path / "model.safetensors.index.json"
    if not index_file.is_file():
        return
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LowbitError(f"{index_file} is not a valid safetensors index: {_one_line(exc)}") from exc
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise LowbitError(f"{index_file.name} names shards that are missing: {', '.join(missing)}")


def check_model_dir(path: Path) -> dict[str, Any]:
    """Validate a model directory without loading weights and return its config dict.

    Checks, in order: config.json is a JSON object; its ``model_type`` has an architecture table; at
    least one ``*.safetensors`` file exists (pickle checkpoints are refused); the sharded index, if any,
    names only present files; every safetensors header parses (this catches truncated downloads).

    Raises:
        LowbitError: naming the first problem found.
    """
    path = Path(path)
    config = _read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise LowbitError(f"{path / 'config.json'} has no model_type")
    arch_table(model_type)  # raises, listing the supported types

    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise LowbitError(
                f"{str(path)!r} has only pickle weights ({', '.join(pickles)}); lowbit loads safetensors "
                "only and never unpickles: convert the checkpoint to safetensors first"
            )
        raise LowbitError(f"{str(path)!r} has no *.safetensors weight files")
    _check_index(path)

    for weight_file in weight_files:
        # safe_open reads and validates only the JSON header (and that the data region matches the file
        # size), so this is cheap even for large shards.
        try:
            with safe_open(str(weight_file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise LowbitError(f"{weight_file} is truncated or corrupt: {_one_line(exc)}") from exc
    return config


def load_float_model(
    model: str | Path | None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ArchTable, Path]:
    """Load a float causal LM and its tokenizer for quantization.

    Args:
        model: see :func:`resolve_model_dir`.
        dtype: weight dtype; None keeps the checkpoint's own (transformers' ``dtype="auto"``: the
            config's ``dtype``/``torch_dtype``, else the first floating weight's dtype).
        device: where the model is put after loading, e.g. ``"cpu"`` or ``"cuda:0"``.
        trust_remote_code: passed to transformers; only needed for models with custom code.

    Returns:
        ``(model, tokenizer, table, path)``: the model in eval mode, its tokenizer, the architecture table
        for its ``model_type``, and the resolved directory.

    Raises:
        LowbitError: any problem with the directory, or a load that fails or leaves weights missing.
    """
    try:
        target_device = torch.device(device)
    except RuntimeError as exc:
        raise LowbitError(f"unknown device {device!r}: {_one_line(exc)}") from exc
    path = resolve_model_dir(model)
    config = check_model_dir(path)
    table = arch_table(config["model_type"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # transformers 5 names the argument `dtype` (`torch_dtype` survives only as a deprecated alias).
        loaded, info = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=dtype if dtype is not None else "auto",
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        # RuntimeError is how transformers reports weights whose shapes contradict config.json.
        raise LowbitError(f"could not load the model in {str(path)!r}: {_one_line(exc)}") from exc

    # transformers only warns about weights absent from the checkpoint and fills them with random values;
    # quantizing a partly random model would give meaningless numbers, so it is an error here.
    problems = [*info.get("missing_keys", ()), *(str(k) for k in info.get("mismatched_keys", ()))]
    if problems:
        shown = ", ".join(sorted(problems)[:5]) + (" ..." if len(problems) > 5 else "")
        raise LowbitError(
            f"the checkpoint in {str(path)!r} lacks or mis-shapes {len(problems)} weights: {shown}"
        )

    try:
        loaded = loaded.to(target_device)
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA asked for on a CPU-only torch
        raise LowbitError(f"cannot move the model to {device!r}: {_one_line(exc)}") from exc
    loaded.eval()
    return loaded, tokenizer, table, path
