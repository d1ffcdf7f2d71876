"""lowbit.load and `quantize eval` refuse a checkpoint they would misread, with one line naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.errors import LowbitError


@pytest.fixture()
def checkpoint(quantized_stories, tmp_path: Path) -> Path:
    """A private copy of the stories260K w4a16 output, free to edit."""
    out, _ = quantized_stories("w4a16")
    dst = tmp_path / "ckpt"
    shutil.copytree(out, dst)
    return dst


def _edit_config(directory: Path, **entries: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(entries)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("transform_config", {"config_groups": {"R1": {"type": "random-matrix", "apply": [], "head_dim": 8}}},
      "transform type 'random-matrix' is not one lowbit applies"),
     ("transform_config", {"config_groups": {"R1": {"type": "hadamard", "apply": []}}}, "needs head_dim"),
     ("transform_config", {"config_groups": {"R1": {"type": "hadamard", "head_dim": 8, "apply": [
         {"targets": ["Linear"], "location": "output", "inverse": False}]}}}, "applies online transforms at input"),
     ("kv_cache_scheme", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"},
      "lowbit applies dynamic per-token, per-head KV quantization"),
     ("sparsity_config", {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"]},
      "has a 'sparsity_config', which lowbit does not apply yet")],
)
def test_unapplied_quantization_config_keys_are_refused(checkpoint: Path, key: str, value: object, message: str) -> None:
    _edit_config(checkpoint, **{key: value})
    with pytest.raises(LowbitError, match=message):
        lowbit.load(checkpoint)
    result = CliRunner().invoke(app, ["eval", "ppl", str(checkpoint), "--limit", "1", "--seqlen", "32"])
    assert result.exit_code == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_null_or_empty_keys_load(checkpoint: Path) -> None:
    """What lowbit itself writes (kv_cache_scheme null) and empty sections mean nothing to apply."""
    _edit_config(checkpoint, kv_cache_scheme=None, transform_config={}, sparsity_config=None)
    assert lowbit.load(checkpoint) is not None


def test_tensors_must_have_the_dtype_the_config_promises(checkpoint: Path) -> None:
    """float32 scales where the config says float16 would be cast silently by load_state_dict: refused."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight_scale"
    assert tensors[name].dtype.itemsize == 2
    tensors[name] = tensors[name].float()
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=f"{name} is torch.float32 .* but its config says torch.float16"):
        lowbit.load(checkpoint)
