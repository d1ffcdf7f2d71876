"""lowbit.load builds the model on the meta device and materialises only the checkpoint's tensors (issue 17), from
one ``model.safetensors`` or from transformers' shards, with the logits the loader gave before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import INDEX_FILE, WEIGHTS_FILE, parse_quantization_config, scheme_for, weight_files
from lowbit.kernels.online import OnlineHadamard
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.loading import set_module
from lowbit.models.quantized import _install_online
from lowbit.quantize.report import inspect_dir


def _reference_load(directory: Path) -> PreTrainedModel:
    """The loader before issue 17: a randomly initialised float model on the CPU, its quantized linears swapped for
    QuantLinear, online transforms installed, every tensor copied in by ``load_state_dict``."""
    config = AutoConfig.from_pretrained(directory)
    qc = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if qc is not None:
        groups, ignore = parse_quantization_config(qc)
        for name, module in list(model.named_modules()):
            ls = scheme_for(name, type(module).__name__, groups, ignore) if isinstance(module, nn.Linear) else None
            if ls is not None:
                set_module(model, name, QuantLinear(module.in_features, module.out_features, ls.weights, ls.activations,
                                                    torch.float32, module.bias is not None, scale_dtype=ls.scale_dtype))
        _install_online(model, qc)
        for m in model.modules():
            if isinstance(m, OnlineHadamard):
                m.to_empty(device="cpu")  # _install_online builds them on meta now; the copy below fills them
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        tensors.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if missing:
        model.tie_weights()
    return model.eval()


def _logits(model: PreTrainedModel) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _assert_materialised(model: PreTrainedModel) -> None:
    """Nothing on meta: parameters, buffers (persistent or not) and the online transforms' derived tensors."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors and not [name for name, t in tensors if t.is_meta]
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m._w_hat is None and m._kernel_args is None  # caches start empty, built from the loaded codes
        if isinstance(m, OnlineHadamard):
            assert all(t is None or not t.is_meta for t in (m.weight, m.signs, m.dense))


def _shard(src: Path, dst: Path, parts: int) -> list[str]:
    """Copy checkpoint ``src`` to ``dst`` with its tensors split over ``parts`` shards and an index, as transformers
    writes them (``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``). Returns the shard names."""
    shutil.copytree(src, dst)
    (dst / WEIGHTS_FILE).unlink()
    tensors = load_file(str(src / WEIGHTS_FILE))
    keys = sorted(tensors)
    names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map: dict[str, str] = {}
    for i, name in enumerate(names):
        chunk = {k: tensors[k] for k in keys[i::parts]}
        save_file(chunk, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return names


@pytest.fixture(scope="module")
def stories_w4(quantized_stories) -> Path:
    return quantized_stories("w4a16")[0]


@pytest.fixture(scope="module")
def sharded(stories_w4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("sharded") / "ckpt"
    _shard(stories_w4, dst, 3)
    return dst


@pytest.fixture(scope="module")
def llama_rot(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tied random Llama quantized with online R3 + R4 transforms and an INT4 KV cache."""
    from lowbit.quantize.pipeline import quantize_model

    out = tmp_path_factory.mktemp("rot") / "w4a4kv4-rot"
    quantize_model(llama_dir, "w4a4kv4-rot", out, samples=4, calib_seqlen=32, seed=0, progress=False)
    return out


def test_quantized_load_gives_the_old_loaders_logits(stories_w4: Path) -> None:
    model, ref = lowbit.load(stories_w4), _reference_load(stories_w4)
    _assert_materialised(model)
    assert torch.equal(_logits(model), _logits(ref))
    # Buffers the checkpoint does not hold (the rotary embedding's inv_freq) are computed, not left empty.
    own = dict(model.named_buffers())
    rotary = {k: b for k, b in ref.named_buffers() if "rotary" in k}
    assert rotary and all(torch.equal(own[k], b) for k, b in rotary.items())


def test_float_dir_loads_with_the_old_loaders_logits(stories_dir: Path) -> None:
    model = lowbit.load(stories_dir)
    _assert_materialised(model)
    assert torch.equal(_logits(model), _logits(_reference_load(stories_dir)))


def test_online_transforms_kv_cache_and_tied_head(llama_dir: Path, llama_rot: Path, tmp_path: Path) -> None:
    model = lowbit.load(llama_rot)
    _assert_materialised(model)
    assert any(isinstance(m, OnlineHadamard) for m in model.modules())
    assert model.config._attn_implementation == _reference_load(llama_rot).config._attn_implementation != "sdpa"
    assert torch.equal(_logits(model), _logits(_reference_load(llama_rot)))
    # A tied lm_head the checkpoint leaves out is the embedding again, not a meta tensor.
    tied = lowbit.load(_quantize(llama_dir, tmp_path / "w4a16", "w4a16"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def _quantize(model_dir: Path, out: Path, recipe: str) -> Path:
    from lowbit.quantize.pipeline import quantize_model

    quantize_model(model_dir, recipe, out, samples=4, calib_seqlen=32, seed=0, progress=False)
    return out


def test_sharded_checkpoint_loads_like_the_single_file(stories_w4: Path, sharded: Path) -> None:
    assert len(weight_files(sharded)) == 3 and not (sharded / WEIGHTS_FILE).exists()
    model = lowbit.load(sharded)
    _assert_materialised(model)
    assert torch.equal(_logits(model), _logits(lowbit.load(stories_w4)))
    info = inspect_dir(sharded)
    assert info["size_after"] == sum(f.stat().st_size for f in weight_files(sharded))
    assert info["bits_per_weight"] == inspect_dir(stories_w4)["bits_per_weight"]


def test_missing_shard_is_one_line(sharded: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(sharded, broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LowbitError, match="model-00002-of-00003.safetensors") as e:
        lowbit.load(broken)
    assert "\n" not in str(e.value)


def _edited_copy(source: Path, tmp_path: Path, file: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of checkpoint ``source`` whose weight ``file`` holds its tensors after ``edit`` (in place); both."""
    copy = tmp_path / "ckpt"
    shutil.copytree(source, copy)
    tensors = load_file(str(copy / file))
    edit(tensors)
    save_file(tensors, str(copy / file), metadata={"format": "pt"})
    return copy, tensors


def _one_line_load_error(directory: Path, match: str) -> None:
    with pytest.raises(LowbitError, match=match) as e:
        lowbit.load(directory)
    assert "\n" not in str(e.value)


def test_tensor_missing_from_every_shard_is_one_line(sharded: Path, tmp_path: Path) -> None:
    gone: list[str] = []
    broken, _ = _edited_copy(sharded, tmp_path, "model-00001-of-00003.safetensors",
                             lambda t: gone.append(sorted(t)[0]) or t.pop(gone[0]))
    _one_line_load_error(broken, f"does not match its config \\(e.g. {gone[0]}")


def test_float_tensor_of_another_shape_is_one_line(stories_w4: Path, tmp_path: Path) -> None:
    broken, _ = _edited_copy(stories_w4, tmp_path, WEIGHTS_FILE, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    _one_line_load_error(broken, r"model.norm.weight has shape \[7\], but its config.json makes it")


def test_float_parameter_stored_in_another_dtype_is_cast(stories_w4: Path, tmp_path: Path) -> None:
    """As load_state_dict's copy did: a float16 norm gain in a float32 model becomes float32."""
    copy, tensors = _edited_copy(stories_w4, tmp_path, WEIGHTS_FILE,
                                 lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    model = lowbit.load(copy)
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"].float())
