"""``lowbit.load``: a quantized (or float) checkpoint back to a runnable transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import (
    check_supported, matches, parse_kv_cache_scheme, parse_quantization_config, parse_transform_config, scheme_for,
)
from lowbit.kernels.online import INPUT, OnlineHadamard, TransformedLinear
from lowbit.models.arch import arch_table
from lowbit.models.attention import attention_modules, install_attention
from lowbit.kernels.dispatch import Backend, resolve_backend
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.loading import check_model_dir, load_float_model, resolve_model_dir, set_module


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    return tensors


def _check_stored(model: nn.Module, tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Every quantized layer's stored tensor has the dtype and shape its config promises (load_state_dict would
    cast a float32 scale into a float16 buffer silently, or stop with a traceback on a shape)."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        for key, buf in module.named_buffers(prefix=name, recurse=False):
            t = tensors.get(key)
            if t is not None and (t.dtype != buf.dtype or t.shape != buf.shape):
                raise LowbitError(f"checkpoint {model_dir}: {key} is {t.dtype} {list(t.shape)}, but its config says "
                                  f"{buf.dtype} {list(buf.shape)}")


def _install_online(model: PreTrainedModel, qc: dict[str, Any]) -> None:
    """Attach the online transforms of ``transform_config`` to their modules (matrices come with the state dict)
    and give the attention modules the KV scheme; either one switches the model to lowbit's attention function."""
    transforms = parse_transform_config(qc)
    modules = list(model.named_modules())
    for t in transforms:
        child_name, hits = f"{t.group}_{t.location}", 0
        for name, module in modules:
            if not any(matches(name, type(module).__name__, target) for target in t.targets):
                continue
            hits += 1
            child = OnlineHadamard(t.block)
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
    its float weights. Weights are read from
    safetensors only and no remote code is trusted. Returns the model in eval mode on ``device``.
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
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        ls = scheme_for(name, type(module).__name__, groups, ignore)
        if ls is not None:
            ql = QuantLinear(module.in_features, module.out_features, ls.weights, ls.activations, dtype,
                             module.bias is not None, backend, scale_dtype=ls.scale_dtype)
            set_module(model, name, ql)

    _install_online(model, qc)
    tensors = _read_tensors(model_dir)
    _check_stored(model, tensors, model_dir)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        bad = sorted(set(missing) - tied)[:3] or sorted(unexpected)[:3]
        raise LowbitError(f"checkpoint {model_dir} does not match its config (e.g. {', '.join(bad)})")
    if tied:
        model.tie_weights()
    return model.eval().to(device)

