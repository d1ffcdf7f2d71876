"""OSTQuant: the learned transforms are exact equivalences of the float model (q -> k scaling included, through RoPE),
training keeps the rotations orthogonal and the float logits unchanged, runs repeat exactly, bad settings fail in
one line, and Ctrl-C during training leaves nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.calibrate.sources import calibration_texts
from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.models.attention import attention_modules, install_attention
from lowbit.models.loading import check_model_dir, get_module, load_float_model
from lowbit.quantize.destination import REPORT_FILE
from lowbit.quantize.pipeline import quantize_model
from lowbit.quantize.recipe import Recipe
from lowbit.quantize.transforms.apply import apply_model_transforms, check_model
from lowbit.quantize.transforms.base import Scope, TrainContext
from lowbit.quantize.transforms.ost import OstParams
from lowbit.quantize.transforms.ost_train import CPU_DEFAULTS, CUDA_DEFAULTS, OstSettings
from lowbit.quantize.transforms.rotations import fold_norms
from lowbit.quantize.transforms.spec import TransformSpec as T
from lowbit.quantize.transforms.stiefel import orthogonality_error

W4 = WeightScheme(bits=4, strategy="group", group_size=16, symmetric=True)
A4 = ActScheme(bits=4, symmetric=False, clip_ratio=0.9)
KV4 = ActScheme(bits=4, symmetric=False, clip_ratio=0.95)


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _folded(directory: Path) -> tuple[torch.nn.Module, object, object, torch.Tensor]:
    model, tok, table, _ = load_float_model(directory)
    before = _logits(model)
    fold_norms(model, table, table.geometry(check_model_dir(directory)), Scope(True, tuple(get_module(model, table.blocks))))
    return model, tok, table, before


@pytest.mark.parametrize("init", ["hadamard", "womi"])
def test_fused_transforms_keep_the_float_logits(llama_dir: Path, init: str) -> None:
    """Random scales everywhere (norms, v->o, up->down, q->k) and either start: the logits move by rounding only."""
    model, _, table, before = _folded(llama_dir)
    g = table.geometry(check_model_dir(llama_dir))
    params = OstParams(g, 2, table)
    if init == "womi":
        params.init_womi(model, seed=3)
    else:
        params.init_hadamard(seed=3)
    assert orthogonality_error(params.R1.detach()) < 1e-12 and orthogonality_error(params.R2.detach()) < 1e-12
    assert params.s_qk is not None
    with torch.no_grad():
        for s in params.scales():
            s.uniform_(0.5, 2.0)
    weights_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    params.fuse(model)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, weights_before)
    assert _rel(_logits(model), before) < 1e-5


def test_qk_scaling_must_be_equal_on_each_rope_pair(llama_dir: Path) -> None:
    """The control: a q -> k scaling that differs within a RoPE pair (i, i + d/2) changes the logits, which is why
    OstParams ties the two halves."""
    model, _, table, before = _folded(llama_dir)
    g = table.geometry(check_model_dir(llama_dir))
    params = OstParams(g, 2, table)
    with torch.no_grad():
        params.s_qk.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    u = params.qk_vector(0)
    assert u is not None and torch.equal(u[:, : g.head_dim // 2], u[:, g.head_dim // 2 :])
    params.fuse(model)
    assert _rel(_logits(model), before) < 1e-5
    untied = torch.linspace(0.5, 2.0, g.head_dim)  # the same shape of scaling, but not paired
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(untied.repeat(g.heads)[:, None])
            layer.self_attn.k_proj.weight.div_(untied.repeat(g.kv_heads)[:, None])
    assert _rel(_logits(model), before) > 1e-3


def _train(directory: Path, act: ActScheme | None, kv: ActScheme | None, dtype: torch.dtype = torch.float32,
           **options: object) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    model, tok, table, before = _folded(directory)
    model.to(dtype)
    specs = (T("r3"), T("ost", steps=3, batch=2, seqlen=32, **options), T("r4", block=32))
    g = check_model(specs, table, check_model_dir(directory))
    if kv is not None:
        install_attention(model, [m for _, m in attention_modules(model, table.blocks, table.attention)], kv)
    ctx = TrainContext(calibration_texts(None), tok, W4, act, kv, (), "cpu", 0, False)
    reports = apply_model_transforms(model, table, g, specs[:2], ctx)
    return model, reports["ost"], before


@pytest.mark.parametrize("act, kv", [(None, None), (A4, KV4)], ids=["w4a16", "w4a4kv4"])
def test_training_keeps_rotations_orthogonal_and_the_float_model_unchanged(llama_dir: Path, act, kv) -> None:  # type: ignore[no-untyped-def]
    model, report, before = _train(llama_dir, act, kv, lr=0.2, scale_lr=0.05)
    assert len(report["losses"]) == 3 and all(l > 0 for l in report["losses"])
    assert report["orthogonality_error"] < 1e-5
    assert 0 < report["held_out_loss_before"] < float("inf") and 0 < report["held_out_loss_after"] < float("inf")
    install_attention(model, [m for _, m in attention_modules(model, "model.layers", "self_attn")], None)  # float KV
    after = _logits(model)
    assert _rel(after, before) < 1e-4
    assert report["settings"]["steps"] == 3 and report["settings"]["loss"] == "kl-top"


def test_training_moves_the_transforms_and_repeats_exactly(llama_dir: Path) -> None:
    a, report_a, _ = _train(llama_dir, A4, KV4, lr=0.2, scale_lr=0.05)
    b, report_b, _ = _train(llama_dir, A4, KV4, lr=0.2, scale_lr=0.05)
    assert report_a["losses"] == report_b["losses"]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    c, _, _ = _train(llama_dir, A4, KV4, lr=0.2, scale_lr=0.05, seed=1)  # another Hadamard start
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_other_losses_and_the_qr_retraction_train(llama_dir: Path, loss: str) -> None:
    _, report, _ = _train(llama_dir, A4, None, loss=loss, retraction="qr", init="womi", lr=0.1)
    assert report["settings"]["loss"] == loss and report["orthogonality_error"] < 1e-5


def test_settings_take_the_device_defaults_and_refuse_bad_values() -> None:
    cpu, gpu = OstSettings.resolve("cpu"), OstSettings.resolve("cuda:0")
    assert (cpu.steps, cpu.batch, cpu.seqlen) == tuple(CPU_DEFAULTS[k] for k in ("steps", "batch", "seqlen"))
    assert (gpu.steps, gpu.batch, gpu.seqlen) == tuple(CUDA_DEFAULTS[k] for k in ("steps", "batch", "seqlen"))
    assert OstSettings.resolve("cpu", steps=7, topk=5).steps == 7
    for bad, message in (({"steps": 0}, "steps must be"), ({"loss": "mse"}, "loss must be one of"),
                         ({"init": "eye"}, "init must be one of"), ({"lr": -1.0}, "learning rates")):
        with pytest.raises(LowbitError, match=message):
            OstSettings.resolve("cpu", **bad)


@pytest.mark.parametrize("specs, message", [
    ((T("ost"),), "needs fold_norms listed before it"),
    ((T("fold_norms"), T("r1"), T("ost")), "learns R1 and R2 itself"),
    ((T("smoothquant"), T("affine")), "one block-level"),
    ((T("fold_norms"), T("r4"), T("ost")), "list r4 after ost"),
])
def test_bad_ost_recipes_are_refused(specs: tuple[T, ...], message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        Recipe("bad", weights=W4, transforms=specs)
    with pytest.raises(LowbitError, match="transform 'ost' has no option 'alpha'"):
        T("ost", alpha=0.3)
    for bad, message in (({"steps": 0}, "steps must be a positive integer"), ({"loss": "mse"}, "loss must be one of"),
                         ({"retraction": "exp"}, "retraction must be one of"), ({"scale_lr": 0.0}, "must be positive")):
        with pytest.raises(LowbitError, match=message):  # when the recipe is read: before any model loads
            T("ost", **bad)


def test_pipeline_reports_the_training_and_writes_a_plain_checkpoint(tmp_path: Path, llama_dir: Path) -> None:
    recipe = Recipe("ost", weights=W4, method="gptq", transforms=(T("fold_norms"), T("ost", steps=2, seqlen=32)))
    out = tmp_path / "o"
    res = quantize_model(llama_dir, recipe, out, samples=4, calib_seqlen=32, progress=False)
    assert len(res.extra["trained_transforms"]["ost"]["losses"]) == 2
    report = json.loads((out / REPORT_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    assert "transform_config" not in config["quantization_config"] and config["tie_word_embeddings"] is False
    assert report["trained_transforms"]["ost"]["losses"] == res.extra["trained_transforms"]["ost"]["losses"]


def test_ctrl_c_during_training_leaves_nothing_written(tmp_path: Path, llama_dir: Path, interrupt_while_training) -> None:  # type: ignore[no-untyped-def]
    """SIGINT while the transforms train: the process stops with an error and no output directory (or staging
    leftover) exists."""
    recipe = {"name": "slow-ost", "weights": {"bits": 4, "group_size": 16},
              "transforms": [{"name": "fold_norms"}, {"name": "ost", "steps": 500, "seqlen": 32, "batch": 1}]}
    interrupt_while_training(llama_dir, tmp_path, recipe, "ost", ["--samples", "2", "--calib-seqlen", "32"])


def test_a_bfloat16_model_trains_in_float32_and_keeps_its_dtype(llama_dir: Path) -> None:
    """Most checkpoints are bf16: the student's float32 stream meets the model's own head, which must not fail."""
    model, report, before = _train(llama_dir, A4, KV4, dtype=torch.bfloat16, lr=0.2)
    assert report["orthogonality_error"] < 1e-5 and all(l > 0 for l in report["losses"])
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    install_attention(model, [m for _, m in attention_modules(model, "model.layers", "self_attn")], None)
    assert _rel(_logits(model).float(), before) < 0.05  # bf16 rounding of the fused weights only
