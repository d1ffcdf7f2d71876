"""``lowbit.load``: a quantized (or float) checkpoint back to a runnable transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import (
    LayerScheme, check_supported, matches, parse_kv_cache_scheme, parse_quantization_config, parse_transform_config,
    scheme_for, weight_files,
)
from lowbit.kernels.online import INPUT, OnlineHadamard, TransformedLinear
from lowbit.models.arch import arch_table
from lowbit.models.attention import attention_modules, install_attention
from lowbit.kernels.dispatch import Backend, resolve_backend
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.loading import check_model_dir, load_float_model, resolve_model_dir, set_module


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on the CPU (safetensors maps the file: pages are read on first use)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LowbitError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _build_empty(
    config: PretrainedConfig, dtype: torch.dtype, groups: list[tuple[list[str], LayerScheme]], ignore: list[str],
    backend: Backend | str,
) -> PreTrainedModel:
    """The model of ``config`` with its quantized linears as QuantLinear, every parameter and stored buffer on the
    meta device (no memory): only the buffers the checkpoint does not hold (the rotary embedding's ``inv_freq``...)
    are real, computed on the CPU by the modules' own constructors as transformers builds them."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        ls = scheme_for(name, type(module).__name__, groups, ignore)
        if ls is not None:
            with torch.device("meta"):  # codes, scales and bias all come from the checkpoint
                ql = QuantLinear(module.in_features, module.out_features, ls.weights, ls.activations, dtype,
                                 module.bias is not None, backend, scale_dtype=ls.scale_dtype)
            set_module(model, name, ql)
    return model


def _check_stored(
    expected: dict[str, torch.Tensor], quantized: set[str], tensors: dict[str, torch.Tensor], model_dir: Path
) -> None:
    """Every stored tensor has the shape the model built from config.json expects (``expected``: its meta state
    dict), and every quantized layer's tensor (``quantized``: their keys) also the dtype its config promises
    (load_state_dict would stop with a traceback on a shape; a cast would change a stored code or scale)."""
    for key, t in tensors.items():
        want = expected.get(key)
        if want is None:
            continue
        if key in quantized and (t.dtype != want.dtype or t.shape != want.shape):
            raise LowbitError(f"checkpoint {model_dir}: {key} is {t.dtype} {list(t.shape)}, but its config says "
                              f"{want.dtype} {list(want.shape)}")
        if t.shape != want.shape:
            raise LowbitError(f"checkpoint {model_dir}: {key} has shape {list(t.shape)}, but its config.json "
                              f"makes it {list(want.shape)}")


def _materialise(model: PreTrainedModel, model_dir: Path) -> None:
    """Replace the meta tensors of ``model`` by the checkpoint's, one weight file (or shard) at a time, by
    assignment: each tensor exists once, as safetensors read it, on the CPU. A float parameter stored in another
    dtype is cast to the model's (as ``load_state_dict`` copying into it would); quantized layers' tensors and
    online transform matrices keep the file's dtype. Ties the embeddings when the checkpoint leaves a tied
    ``lm_head`` out. Raises LowbitError if a tensor is missing from every file, or one is not in the model."""
    expected = model.state_dict()
    quantized = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, QuantLinear)
                 for b, _ in m.named_buffers(recurse=False)}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    loaded: set[str] = set()
    for path in weight_files(model_dir):
        tensors = _read_file(path)
        _check_stored(expected, quantized, tensors, model_dir)
        for key, t in tensors.items():
            if key in params and t.is_floating_point() and t.dtype != expected[key].dtype:
                tensors[key] = t.to(expected[key].dtype)
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded |= tensors.keys()
    missing, unexpected = expected.keys() - loaded, loaded - expected.keys()
    tie = getattr(model.config, "tie_word_embeddings", False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if tie else set()
    if missing - tied or unexpected:
        bad = sorted(missing - tied)[:3] or sorted(unexpected)[:3]
        raise LowbitError(f"checkpoint {model_dir} does not match its config (e.g. {', '.join(bad)})")
    if tied:
        model.tie_weights()
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer neither the checkpoint holds nor a constructor computed: a bug here, not in the checkpoint
        raise LowbitError(f"checkpoint {model_dir}: loading left {', '.join(left[:3])} without a value")


def _install_online(model: PreTrainedModel, qc: dict[str, Any]) -> None:
    """Attach the online transforms of ``transform_config`` to their modules, on the meta device (their matrices
    come with the state dict, and loading one derives the rest: OnlineHadamard.adopt_weight), and give the
    attention modules the KV scheme; either one switches the model to lowbit's attention function."""
    transforms = parse_transform_config(qc)
    modules = list(model.named_modules())
    for t in transforms:
        child_name, hits = f"{t.group}_{t.location}", 0
        for name, module in modules:
            if not any(matches(name, type(module).__name__, target) for target in t.targets):
                continue
            hits += 1
            child = OnlineHadamard(t.block).to("meta")  # its matrix comes with the checkpoint
            if t.location != INPUT:
                module.add_module(child_name, child)
            elif isinstance(module, QuantLinear):
                module.set_input_transform(child_name, child)
            elif isinstance(module, nn.Linear):
                set_module(model, name, TransformedLinear.wrap(module, child_name, child))
            else:
                raise LowbitError(f"transform {t.group}: an input transform on {name}, which is not a linear layer")
        if hits == 0:
            raise LowbitError(f"transform {t.group} ({t.location}) targets no module of this model: {list(t.targets)[:3]}")
    table = arch_table(model.config.model_type)
    kv = parse_kv_cache_scheme(qc, table.geometry(model.config.to_dict()).head_dim)
    if kv is not None or any(t.location != INPUT for t in transforms):
        install_attention(model, [m for _, m in attention_modules(model, table.blocks, table.attention)], kv)


def load(
    path: str | Path | None = None, device: str = "cpu", backend: Backend | str = Backend.AUTO
) -> PreTrainedModel:
    """Load a lowbit / compressed-tensors checkpoint (or a float HF directory) as a transformers model.

    Quantized linears become :class:`QuantLinear` modules running the kernel ``backend`` resolves to; online
    transforms (``transform_config``) and a quantized KV cache (``kv_cache_scheme``) are applied as
    kernels/online.py and models/attention.py describe; everything else is the ordinary transformers module with
    its float weights. Weights are read from safetensors only (``model.safetensors``, or the shards
    ``model.safetensors.index.json`` names) and no remote code is trusted.

    Memory: the model is built with every parameter and stored buffer on the meta device; only the buffers no
    checkpoint holds (the rotary embedding's ``inv_freq``...) are computed, on the CPU, by their modules. Each file's
    tensors then replace the meta ones by assignment, on the CPU, one file at a time: nothing is allocated twice and
    peak memory is about the checkpoint's size. The tensors stay backed by a private (copy-on-write) mapping of
    their file, as transformers' own loader leaves them, so pages are read from disk on first use and a file must
    not be rewritten in place while the model lives (lowbit's writers replace a directory whole). A float directory
    goes through transformers' ``from_pretrained``, which loads the same way.

    Returns the model in eval mode on ``device`` (moved there from the CPU after loading).
    """
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        raise LowbitError(f"unknown device {device!r}; use cpu or cuda") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
    resolve_backend(backend, device_type)  # an unknown backend, or triton where it cannot run, fails here
    model_dir = resolve_model_dir(path)
    config_dict = check_model_dir(model_dir)
    qc = config_dict.get("quantization_config")
    if qc is None:
        return load_float_model(model_dir, device=device)[0]
    groups, ignore = parse_quantization_config(qc)
    check_supported(qc)

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized modules ourselves
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _build_empty(config, dtype, groups, ignore, backend)
    _install_online(model, qc)
    _materialise(model, model_dir)
    return model.eval().to(device)
