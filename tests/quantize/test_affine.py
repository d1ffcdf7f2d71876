"""AffineQuant (transforms/affine.py): the gradual mask, the dominance projection, exact folds of the norm scales and
the v -> o matrices on stories260K (grouped-query attention: 8 query heads on 4 KV heads), and a short training run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lowbit.calibrate.runner import BlockInputs, capture_block_inputs, run_block
from lowbit.errors import LowbitError
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.kernels.online import OnlineHadamard, TransformedLinear, input_transform
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.loading import get_module, load_float_model, set_module
from lowbit.quantize.transforms import affine
from lowbit.quantize.transforms.affine import (
    EPS,
    AffineResult,
    AffineSettings,
    affine_block,
    equivalent_weights,
    fold_affine,
    gradual_mask,
    make_dominant,
)

W4 = WeightScheme(bits=4, strategy="group", group_size=32)  # divides 64 (q..up, o); down's 172 falls back to channel
SETTINGS = AffineSettings(epochs=4)
Trained = tuple[nn.Module, AffineResult]  # the block after training and fold, and the result


@pytest.fixture(scope="module")
def stories(stories_dir: Path, require: Callable[[object, str], None]) -> dict[str, Any]:
    """stories260K, its block 0, 8 random windows of 32 tokens (batch 1) and the float outputs of block 0."""
    require(stories_dir.is_dir(), "../shared/models/stories260K")
    model, _, table, _ = load_float_model(stories_dir)
    geometry = table.geometry(model.config.to_dict())
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, table, windows, 1, "cpu")
    block = get_module(model, table.blocks)[0]
    return {"block": block, "table": table, "geometry": geometry, "inputs": inputs, "ref": run_block(block, inputs)}


def _branch_error(out: list[torch.Tensor], ref: list[torch.Tensor], inputs: BlockInputs) -> float:
    """Largest ``|out - ref| / |ref - h|`` over the batches: relative to what the block adds to the residual stream
    (relative to the output itself, the residual ``h`` would hide errors in the attention and MLP branches)."""
    return max(float((o - r).norm() / (r - h).norm()) for o, r, h in zip(out, ref, inputs.hidden))


def _random_transforms(
    geometry: Geometry, table: ArchTable, seed: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Non-trivial scales in [0.25, 4] per norm and dense, dominant v -> o matrices (off-diagonals ~0.3)."""
    g = torch.Generator().manual_seed(seed)
    s = {norm: 2.0 ** (torch.rand(geometry.hidden, generator=g) * 4 - 2) for norm, _ in table.norms}
    d = geometry.head_dim
    A = torch.eye(d) * (1.0 + torch.rand(geometry.kv_heads, d, 1, generator=g)) \
        + 0.3 * torch.randn(geometry.kv_heads, d, d, generator=g)
    return s, make_dominant(A, torch.ones(d, d))


# ---- the gradual mask (ALGORITHMS.md 3.3) ---------------------------------------------------------------------------

def test_mask_first_epoch_is_the_diagonal_and_last_the_damped_full_matrix() -> None:
    D, E, sf = 8, 4, 0.1
    assert torch.equal(gradual_mask(D, 0, E, sf), torch.eye(D))
    last = gradual_mask(D, E - 1, E, sf)
    assert torch.equal(last.diagonal(), torch.ones(D))
    assert torch.equal(last[~torch.eye(D, dtype=torch.bool)], torch.full((D * D - D,), sf))


def test_mask_band_width_follows_the_formula() -> None:
    D, E, sf = 8, 4, 0.01
    for e in range(E):
        n_e = (D - 1) * e // (E - 1) + 1  # 1, 3, 5, 8
        M = gradual_mask(D, e, E, sf)
        for i in range(D):
            for j in range(D):
                expected = 1.0 if i == j else (sf if abs(i - j) < n_e else 0.0)
                assert M[i, j].item() == pytest.approx(expected), (e, i, j)
    assert int((gradual_mask(D, 1, E, sf)[0] > 0).sum()) == 3  # diagonal + 2 off-diagonals


def test_mask_single_epoch_is_the_diagonal() -> None:
    assert torch.equal(gradual_mask(8, 0, 1, 0.5), torch.eye(8))  # E = 1: no division by zero


# ---- strict diagonal dominance --------------------------------------------------------------------------------------

def _strictly_dominant(A: torch.Tensor) -> bool:
    off = A.abs().sum(-1) - A.diagonal(dim1=-2, dim2=-1).abs()
    return bool((off < A.diagonal(dim1=-2, dim2=-1).abs()).all())


@pytest.mark.parametrize("band", [1, 3, 8])
def test_projection_makes_random_matrices_dominant(band: int) -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 8, 8, generator=g)
    A[:5, 0, 0] = 0.0  # a zero diagonal entry must become nonzero
    mask = gradual_mask(8, band - 1, 8, 0.5)  # band diagonals, off-diagonals halved
    assert not _strictly_dominant(A * mask)
    P = make_dominant(A, mask)
    assert _strictly_dominant(P * mask)
    assert torch.all(torch.linalg.det(P * mask).abs() > 0)
    assert torch.equal(P[5:].diagonal(dim1=-2, dim2=-1), A[5:].diagonal(dim1=-2, dim2=-1))  # only rows shrink
    assert torch.equal(P[:5, 0, 0], torch.full((5,), EPS))


def test_projection_leaves_dominant_matrices_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(100, 8, 8, generator=g)
    off = A.abs().sum(-1) - A.diagonal(dim1=-2, dim2=-1).abs()
    sign = torch.where(torch.rand(100, 8, generator=g) < 0.5, -1.0, 1.0)
    A = A + torch.diag_embed(sign * 2.0 * off + sign)  # |a_ii| > 2 * off-diagonal sum: well inside the margin
    assert torch.equal(make_dominant(A, torch.ones(8, 8)), A)


# ---- exact folds ----------------------------------------------------------------------------------------------------

def test_fold_keeps_the_float_block(stories: dict[str, Any]) -> None:
    block, table, geometry, inputs = stories["block"], stories["table"], stories["geometry"], stories["inputs"]
    s, A = _random_transforms(geometry, table)
    folded = copy.deepcopy(block)
    fold_affine(folded, table, geometry, s, A)
    for name in (table.value, table.out, "self_attn.q_proj", "mlp.up_proj"):  # the transforms are not trivial
        before, after = get_module(block, name).weight, get_module(folded, name).weight
        assert (after - before).abs().max() > 0.1 * before.abs().max(), name
    assert _branch_error(run_block(folded, inputs), stories["ref"], inputs) < 1e-5


def test_training_path_without_quantization_keeps_the_float_block(stories: dict[str, Any]) -> None:
    """The float32 weights the loop trains through (before fake-quant) compute the float block; a v fold without its
    o side does not (the check can fail)."""
    block, table, geometry, inputs = stories["block"], stories["table"], stories["geometry"], stories["inputs"]
    s, A = _random_transforms(geometry, table, seed=2)
    params = {n: p.detach().float() for n, p in block.named_parameters()}
    new = equivalent_weights(params, table, geometry, s, A)
    out = [functional_call(block, new, (h,), kw).detach() for h, kw in zip(inputs.hidden, inputs.kwargs)]
    assert _branch_error(out, stories["ref"], inputs) < 1e-5
    new[f"{table.out}.weight"] = params[f"{table.out}.weight"]
    out = [functional_call(block, new, (h,), kw).detach() for h, kw in zip(inputs.hidden, inputs.kwargs)]
    assert _branch_error(out, stories["ref"], inputs) > 1e-2


# ---- training -------------------------------------------------------------------------------------------------------

def _train(stories: dict[str, Any], act: ActScheme | None = None, block: nn.Module | None = None) -> Trained:
    block = copy.deepcopy(stories["block"]) if block is None else block
    inputs = stories["inputs"]
    result = affine_block(block, stories["table"], stories["geometry"], inputs.hidden, inputs.kwargs, stories["ref"],
                          W4, act, SETTINGS)
    return block, result


@pytest.fixture(scope="module")
def trained(stories: dict[str, Any]) -> Trained:
    return _train(stories)


def test_training_lowers_the_loss_and_keeps_the_float_block(stories: dict[str, Any], trained: Trained) -> None:
    block, result = trained
    assert len(result.losses) == SETTINGS.epochs
    assert (result.loss_first, result.loss_last) == (result.losses[0], result.losses[-1])
    assert result.loss_last < result.loss_first
    assert _branch_error(run_block(block, stories["inputs"]), stories["ref"], stories["inputs"]) < 1e-5
    assert any(not torch.equal(p, q) for p, q in zip(block.parameters(), stories["block"].parameters()))
    assert all(p.requires_grad for p in block.parameters())  # the flags are restored


def test_training_returns_clip_factors_per_scale_group(stories: dict[str, Any], trained: Trained) -> None:
    _, result = trained
    table = stories["table"]
    assert set(result.clip) == set(table.linears)
    for name, clip in result.clip.items():
        weight = get_module(stories["block"], name).weight
        groups = weight.shape[1] // 32 if weight.shape[1] % 32 == 0 else 1  # 172 inputs: one scale per channel
        assert clip.shape == (weight.shape[0], groups), name
        assert torch.all((clip > 0) & (clip <= 1)), name
        assert not torch.all(clip == clip.flatten()[0]), name  # learned per group, not left at the init


def test_training_is_deterministic(stories: dict[str, Any], trained: Trained) -> None:
    block, result = trained
    again, result2 = _train(stories)
    assert result.losses == result2.losses
    assert all(torch.equal(p, q) for p, q in zip(block.parameters(), again.parameters()))


def test_quantized_activations_change_the_loss_and_leave_no_hooks(stories: dict[str, Any], trained: Trained) -> None:
    block, result = _train(stories, ActScheme(bits=4))
    assert result.losses[0] > trained[1].losses[0]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in block.modules())
    assert _branch_error(run_block(block, stories["inputs"]), stories["ref"], stories["inputs"]) < 1e-5


def _with_online_input(block: nn.Module, name: str) -> nn.Module:
    block = copy.deepcopy(block)
    linear = get_module(block, name)
    set_module(block, name, TransformedLinear.wrap(linear, "R4_input", OnlineHadamard(4)))
    return block


def test_online_input_transform_on_a_folded_linear_is_refused(stories: dict[str, Any]) -> None:
    with pytest.raises(LowbitError, match="online input transform"):
        _train(stories, block=_with_online_input(stories["block"], "self_attn.o_proj"))


def test_online_input_transform_on_down_is_quantized_after_it(
    stories: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """down_proj's activations are quantized in the rotated basis: every 172-wide tensor the quantizer sees is an
    output of the online transform."""
    block = _with_online_input(stories["block"], "mlp.down_proj")
    rotated: list[torch.Tensor] = []
    quantized: list[torch.Tensor] = []
    transform = input_transform(get_module(block, "mlp.down_proj"))
    spy = transform.register_forward_hook(lambda m, i, out: rotated.append(out))
    real = affine.fake_quantize_activation
    monkeypatch.setattr(affine, "fake_quantize_activation",
                        lambda x, act, ste=False: quantized.append(x) or real(x, act, ste))
    _train(stories, ActScheme(bits=4), block=block)
    spy.remove()
    wide = [x for x in quantized if x.shape[-1] == 172]
    assert len(wide) == len(stories["inputs"].hidden) * SETTINGS.epochs
    assert all(any(x is r for r in rotated) for x in wide)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in block.modules())


def test_bad_inputs_are_refused(stories: dict[str, Any]) -> None:
    with pytest.raises(LowbitError, match="epochs"):
        AffineSettings(epochs=0)
    inputs = stories["inputs"]
    fp8 = WeightScheme(format="float", bits=8, fp="e4m3", strategy="channel", group_size=None)
    with pytest.raises(LowbitError, match="int grid"):
        affine_block(copy.deepcopy(stories["block"]), stories["table"], stories["geometry"], inputs.hidden,
                     inputs.kwargs, stories["ref"], fp8, None, SETTINGS)
    with pytest.raises(LowbitError, match="matching"):
        affine_block(copy.deepcopy(stories["block"]), stories["table"], stories["geometry"], inputs.hidden,
                     inputs.kwargs, stories["ref"][:1], W4, None, SETTINGS)


def test_rebatch_cuts_windows_and_their_keyword_arguments() -> None:
    hidden = [torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2), torch.zeros(4, 3, 2)]
    targets = [h + 1 for h in hidden]
    kw = [{"position_embeddings": (torch.ones(4, 3, 2), torch.ones(4, 3, 2)), "position_ids": torch.arange(3)[None],
           "attention_mask": None}] * 2
    h, k, y = affine.rebatch(hidden, kw, targets, samples=5, batch=2)
    assert [t.shape[0] for t in h] == [2, 2, 1] and torch.equal(torch.cat(h), torch.cat(hidden)[:5])
    assert torch.equal(torch.cat(y), torch.cat(targets)[:5])
    assert [x["position_embeddings"][0].shape[0] for x in k] == [2, 2, 1]
    assert all(x["position_ids"].shape == (1, 3) and x["attention_mask"] is None for x in k)


def test_pipeline_trains_every_block_and_writes_a_plain_checkpoint(tmp_path: Path, llama_dir: Path) -> None:
    """The registered transform through quantize_model: one report per block (epochs losses), settings from the
    recipe over the CPU defaults, a fused-only checkpoint; bad options fail in one line."""
    import json

    from lowbit.quantize.pipeline import quantize_model
    from lowbit.quantize.recipe import Recipe
    from lowbit.quantize.transforms.spec import TransformSpec as T

    recipe = Recipe("aff", weights=WeightScheme(bits=4, strategy="group", group_size=16), method="gptq",
                    transforms=(T("affine", epochs=2, samples=4),))
    out = tmp_path / "o"
    res = quantize_model(llama_dir, recipe, out, samples=4, calib_seqlen=32, progress=False)
    reports = res.extra["trained_transforms"]["affine"]
    assert len(reports) == 2 and all(len(r["losses"]) == 2 for r in reports)
    assert reports[0]["settings"]["samples"] == 4 and reports[0]["settings"]["batch"] == affine.CPU_DEFAULTS["batch"]
    assert "transform_config" not in json.loads((out / "config.json").read_text())["quantization_config"]
    with pytest.raises(LowbitError, match="transform 'affine': samples must be a positive integer, got 0"):
        T("affine", samples=0)
    with pytest.raises(LowbitError, match="transform 'affine': stability must be in"):
        T("affine", stability=2.0)
