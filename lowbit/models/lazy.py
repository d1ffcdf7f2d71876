"""A float causal LM read from its safetensors files one decoder block at a time (models larger than memory).

:func:`open_lazy_model` builds the transformers model on the meta device (no memory), then puts on the CPU only
the modules outside the decoder blocks (embedding, final norm, lm_head, rotary embedding) with the checkpoint's
tensors. :meth:`LazyModel.load_block` materialises one block from the files (single ``model.safetensors`` or
transformers' shards with their index) and :meth:`LazyModel.release_block` sends it back to the meta device, so
the float model never is in memory whole: peak memory is the head modules plus the blocks being worked on.

The modules outside the blocks come from a one-block copy of the model built normally on the CPU (so buffers that
are not in the checkpoint, such as the rotary ``inv_freq``, are computed by transformers itself), then overwritten
with the checkpoint's tensors. A block holds only parameters and persistent buffers, all of which must be in the
checkpoint (the llama/qwen/mistral blocks of models/arch.py do). The tensors are the checkpoint's, cast to the
model dtype as ``from_pretrained(dtype="auto")`` casts them: a model read here computes exactly what
:func:`lowbit.models.loading.load_float_model` loads (tests/quantize/test_scale.py).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import weight_files
from lowbit.models.arch import ArchTable, arch_table
from lowbit.models.loading import check_model_dir, get_module, resolve_model_dir, set_module


def _model_dtype(config: Any, first_float: torch.dtype | None) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` gives: the config's, else the first floating weight's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return first_float or torch.float32


class LazyModel:
    """A causal LM whose decoder blocks stay in the checkpoint files until asked for.

    Attributes:
        model: the transformers model, in eval mode; its blocks are on the meta device except those loaded.
        tokenizer, table, path: the tokenizer, the architecture table and the model directory.
        dtype: the model dtype every tensor is cast to.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, table: ArchTable, path: Path,
                 locations: dict[str, Path], dtype: torch.dtype) -> None:
        self.model, self.tokenizer, self.table, self.path, self.dtype = model, tokenizer, table, path, dtype
        self._locations = locations

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's decoder blocks (``table.blocks``)."""
        return get_module(self.model, self.table.blocks)  # type: ignore[return-value]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors ``names``, each read from its file (one at a time, never a whole file)."""
        missing = [n for n in names if n not in self._locations]
        if missing:
            raise LowbitError(f"the checkpoint in {str(self.path)!r} lacks {len(missing)} weights: {', '.join(missing[:5])}")
        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for n in names:
                f = self._locations[n]
                if f not in handles:
                    try:
                        handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                    except (SafetensorError, OSError) as exc:
                        raise LowbitError(f"cannot read {f}: {str(exc).splitlines()[0]}") from None
                out[n] = handles[f].get_tensor(n)
        return out

    def _fill(self, module: nn.Module, prefix: str) -> None:
        """Put ``module``'s checkpoint tensors (names under ``prefix``) into its parameters and persistent buffers."""
        names = [f"{prefix}{k}" for k in module.state_dict(keep_vars=True)]
        tensors = self.read(names)
        with torch.no_grad():
            for k, t in module.state_dict(keep_vars=True).items():
                t.copy_(tensors[f"{prefix}{k}"])

    def load_block(self, i: int) -> nn.Module:
        """Materialise block ``i`` on the CPU with its checkpoint tensors (in the model dtype) and return it."""
        block = self.blocks[i]
        if any(p.is_meta for p in block.parameters()):
            buffers = {n for n, _ in block.named_buffers()}
            persistent = set(block.state_dict(keep_vars=True))
            if buffers - persistent:
                raise LowbitError(f"block {i} has buffers that are not in the checkpoint ({sorted(buffers - persistent)[:3]}): "
                                  "it cannot be read block by block")
            block.to_empty(device="cpu")
            self._fill(block, f"{self.table.blocks}.{i}.")
        return block

    def release_block(self, i: int) -> None:
        """Free block ``i``'s tensors (the block goes back to the meta device; its modules stay)."""
        self.blocks[i].to("meta")

    def release_head(self) -> None:
        """Free the parameters outside the blocks (embedding, final norm, lm_head: back to meta) once they are saved
        elsewhere; buffers (rotary tables) stay."""
        replaced: dict[int, nn.Parameter] = {}  # a tied lm_head shares the embedding's parameter: one replacement
        for name, module in self.model.named_modules():
            if name == self.table.blocks or name.startswith(self.table.blocks + "."):
                continue
            for key, p in list(module._parameters.items()):
                if p is not None:
                    if id(p) not in replaced:
                        replaced[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                    module._parameters[key] = replaced[id(p)]

    def load_all(self) -> None:
        """Materialise every block (recipes that need the whole float model at once)."""
        for i in range(len(self.blocks)):
            self.load_block(i)


def _locations(path: Path) -> tuple[dict[str, Path], torch.dtype | None]:
    """tensor name -> file holding it, for every weight file of ``path``; and the first floating tensor's dtype."""
    found: dict[str, Path] = {}
    first_float: torch.dtype | None = None
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():
                    found.setdefault(k, f)
                    if first_float is None:
                        dtype = handle.get_slice(k).get_dtype()
                        first_float = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype)
        except (SafetensorError, OSError) as exc:
            raise LowbitError(f"{f} is truncated or corrupt: {str(exc).splitlines()[0]}") from None
    return found, first_float


def _one_block_config(config: Any) -> Any:
    """A copy of ``config`` with one decoder layer (per-layer lists cut to their first entry)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    for key in ("layer_types",):
        value = getattr(small, key, None)
        if isinstance(value, list) and value:
            setattr(small, key, value[:1])
    return small


def open_lazy_model(model: str | Path | None, trust_remote_code: bool = False) -> LazyModel:
    """Open a float model directory for block-by-block reading (see the module docstring).

    Raises:
        LowbitError: any problem with the directory, or a weight the model needs that no file holds.
    """
    path = resolve_model_dir(model)
    config_dict = check_model_dir(path)
    table = arch_table(config_dict["model_type"])
    locations, first_float = _locations(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"could not load the model in {str(path)!r}: {' '.join(str(exc).split())[:300]}") from exc
    dtype = _model_dtype(config, first_float)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    host = AutoModelForCausalLM.from_config(_one_block_config(config), dtype=dtype, trust_remote_code=trust_remote_code)
    for name, module in host.named_modules():
        inside = name == table.blocks or name.startswith(table.blocks + ".")
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if name and not inside and own:
            set_module(skeleton, name, module)
    skeleton.config = config
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    lazy = LazyModel(skeleton.eval(), tokenizer, table, path, locations, dtype)
    head = {k for k in skeleton.state_dict(keep_vars=True) if not k.startswith(table.blocks + ".")}
    tied = getattr(config, "tie_word_embeddings", False)
    for name in sorted(head):
        if tied and name.endswith("lm_head.weight") and name not in locations:
            continue  # shares the embedding's storage
        owner, _, leaf = name.rpartition(".")
        tensor = getattr(get_module(skeleton, owner), leaf)
        with torch.no_grad():
            tensor.copy_(lazy.read([name])[name])
    return lazy
