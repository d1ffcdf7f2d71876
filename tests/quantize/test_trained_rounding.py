"""DiscQuant and LR-QAT (quantize/discquant.py, lrqat.py, finetune.py): starts, zero-step identities, one step, the
exact merge, and the pipeline on stories260K (plain checkpoints, same bytes, bad input, Ctrl-C)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lowbit.calibrate.runner import capture_block_inputs
from lowbit.errors import LowbitError
from lowbit.formats.grid import compute_params, round_values
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models.loading import get_module, load_float_model, set_module
from lowbit.quantize.discquant import DiscLinear, DiscTrainer, disc_start
from lowbit.quantize.finetune import Settings, Start, Switch, _Distiller, lr_factor
from lowbit.quantize.gptq import gptq
from lowbit.quantize.lrqat import LrQatLinear, LrQatTrainer, fixed_point, lp_range, lrqat_start
from lowbit.quantize.options import RoundingOptions, TrainingOptions
from lowbit.quantize.pipeline import quantize_model
from lowbit.quantize.recipe import PRESETS, Recipe, recipe_from_dict
from lowbit.quantize.rtn import rtn

W3 = WeightScheme(bits=3, strategy="group", group_size=32)
W2A = WeightScheme(bits=2, strategy="group", group_size=32, symmetric=False)
W4C = WeightScheme(bits=4, strategy="channel", group_size=None)
F16 = Precision(torch.float32, torch.float16)


def _problem(out: int = 48, inp: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(4 * inp, inp, generator=g) * torch.linspace(0.2, 3, inp)
    return W, X.t() @ X / X.shape[0]


def _settings(method: str, **over: Any) -> Settings:
    trainer = {"disc": DiscTrainer, "lrqat": LrQatTrainer}[method]()
    return Settings.resolve(TrainingOptions(**over), "cpu", 0, trainer.cpu, trainer.cuda)


# ---------------------------------------------------------------- starts and zero-step identities


@pytest.mark.parametrize("scheme", [W3, W2A, W4C])
@pytest.mark.parametrize("start", ["gptq", "rtn"])
def test_positions_round_to_the_starting_codes(scheme: WeightScheme, start: str) -> None:
    W, H = _problem()
    res = disc_start(W, H, scheme, F16, RoundingOptions(order="gar", static_groups=False, mse_clip=True, start=start))
    assert res.positions is not None
    assert torch.equal(torch.round(res.positions).to(torch.int8), res.qweight.codes)
    assert float((res.positions - res.qweight.codes.float()).abs().max()) < 0.5


def test_gptq_positions_are_its_compensated_weights() -> None:
    """Without refit, ``positions * s - z s`` is the weight GPTQ rounded: it differs from W (compensation) and
    each code is its nearest grid point; with RTN's start they are W itself."""
    W, H = _problem()
    res = gptq(W, H, W3, Precision(), RoundingOptions(order="natural"), positions=True)
    scale = res.qweight.scale.repeat_interleave(32, dim=1)
    compensated = res.positions * scale
    assert float((compensated - W).abs().max()) > 0.05  # GPTQ moved the weights
    r = rtn(W, None, W3, Precision(), positions=True)
    assert rtn(W, None, W3, Precision()).positions is None and gptq(W, H, W3).positions is None  # only when asked
    inside = (r.positions - r.qweight.codes.float()).abs() < 0.4999
    torch.testing.assert_close((r.positions * r.qweight.scale.repeat_interleave(32, dim=1))[inside], W[inside])


def _quantlinear(W: torch.Tensor, res: Any, act: ActScheme | None = None) -> QuantLinear:
    return QuantLinear.from_quantized(res.qweight, act, torch.float32, None)


@pytest.mark.parametrize("scheme", [W3, W2A])
def test_disc_with_zero_steps_reproduces_its_start(scheme: WeightScheme) -> None:
    W, H = _problem()
    for start in ("gptq", "rtn"):
        for init in ("start", "position"):
            res = disc_start(W, H, scheme, F16, RoundingOptions(start=start))
            twin = DiscLinear(_quantlinear(W, res), Start(W, res), Switch(), init, torch.Generator())
            merged = twin.merged()
            assert torch.equal(merged.codes, res.qweight.codes)
            assert torch.equal(merged.scale, res.qweight.scale)


def test_disc_random_start_is_seeded_and_in_the_unit_interval() -> None:
    W, H = _problem()
    res = disc_start(W, H, W3, F16, RoundingOptions(start="rtn"))
    xs = [DiscLinear(_quantlinear(W, res), Start(W, res), Switch(), "random", torch.Generator().manual_seed(5)).x
          for _ in range(2)]
    assert torch.equal(xs[0], xs[1]) and float(xs[0].detach().min()) >= 0 and float(xs[0].detach().max()) <= 1
    assert float((xs[0].detach() - 0.5).abs().mean()) > 0.2  # uniform, not the positions


def test_lrqat_with_zero_steps_is_rtn_on_the_lp4_range() -> None:
    W, _ = _problem(out=64, inp=128, seed=1)
    scheme = WeightScheme(bits=4, strategy="group", group_size=64)
    res = lrqat_start(W, None, scheme, F16)
    params = compute_params(W, scheme, torch.float16, lp_range(W, scheme, F16))
    ref = round_values(W, params, scheme, W.shape[1]).to(torch.int8)
    assert torch.equal(res.qweight.codes, ref) and torch.equal(res.qweight.scale, params.scale)
    twin = LrQatLinear(_quantlinear(W, res), Start(W, res), Switch(), 32, 1.0, torch.Generator().manual_seed(0))
    merged = twin.merged()
    assert torch.equal(merged.codes, ref) and torch.equal(merged.scale, params.scale)


def test_lp4_range_minimises_the_fourth_power_error() -> None:
    W, _ = _problem(out=8, inp=64, seed=2)
    scheme = WeightScheme(bits=4, strategy="channel", group_size=None)
    clip = lp_range(W, scheme)
    for row in range(3):
        w = W[row : row + 1]
        errs = []
        for k in range(1, 101):
            p = compute_params(w, scheme, torch.float32, k / 100)
            q = round_values(w, p, scheme, w.shape[1]) * p.scale
            errs.append(float((w - q).pow(4).sum()))
        best = min(range(100), key=lambda i: (errs[i], -i))  # a tie goes to the widest range
        assert abs(float(clip[row, 0]) - (best + 1) / 100) < 1e-6


def test_fixed_point_moves_only_exact_half_steps_toward_rtn() -> None:
    phi0 = torch.tensor([[3.49, 3.4999, 2.4999, -0.51, 7.8, -8.3, 0.03]])
    codes = torch.tensor([[3, 3, 2, -1, 7, -8, 0]], dtype=torch.int8)
    phi = fixed_point(phi0, codes, 4, -8, 7)
    assert phi.dtype == torch.int8
    assert torch.equal(torch.round(phi.float() / 16).to(torch.int8), codes)
    # 3.49 * 16 = 55.84 -> 56 = 3.5, a tie that rounds to 4: one unit down; -0.51 -> -8 = -0.5 rounds to 0: one down
    assert phi.tolist() == [[55, 55, 39, -9, 112, -128, 0]]


# ---------------------------------------------------------------- the merge is exact


@pytest.mark.parametrize("act", [None, ActScheme()])
def test_disc_merge_equals_the_training_forward_bit_for_bit(act: ActScheme | None) -> None:
    W, H = _problem()
    res = disc_start(W, H, W2A, F16, RoundingOptions(start="rtn"))
    switch = Switch()
    twin = DiscLinear(_quantlinear(W, res, act), Start(W, res), switch, "random", torch.Generator().manual_seed(1))
    twin.round_()
    x = torch.randn(3, 7, W.shape[1], generator=torch.Generator().manual_seed(2))
    switch.on = True
    with torch.no_grad():
        ours = twin(x)
    merged = QuantLinear.from_quantized(twin.merged(), act, torch.float32, None)
    assert torch.equal(ours, merged(x))
    assert float((twin.merged().codes != res.qweight.codes).float().mean()) > 0.2  # a different rounding


def test_the_held_out_start_is_the_start_whatever_the_init() -> None:
    """``rounded(start=True)`` computes with the start's codes, also from a random x; ``rounded()`` with round(x)."""
    W, H = _problem()
    res = disc_start(W, H, W3, F16, RoundingOptions(start="gptq"))
    switch = Switch()
    twin = DiscLinear(_quantlinear(W, res), Start(W, res), switch, "random", torch.Generator().manual_seed(1))
    start = QuantLinear.from_quantized(res.qweight, None, torch.float32, None)
    x = torch.randn(4, W.shape[1], generator=torch.Generator().manual_seed(2))
    switch.on = True
    with torch.no_grad():
        with twin.rounded(start=True):
            assert torch.equal(twin(x), start(x))
        with twin.rounded():
            assert torch.equal(twin(x), QuantLinear.from_quantized(twin.merged(), None, torch.float32, None)(x))
        assert not torch.equal(twin(x), start(x))  # outside: the relaxed x


def test_lrqat_merge_equals_the_training_forward_bit_for_bit() -> None:
    W, _ = _problem(out=64, inp=128, seed=3)
    res = lrqat_start(W, None, WeightScheme(bits=4, strategy="group", group_size=64), F16)
    switch = Switch()
    twin = LrQatLinear(_quantlinear(W, res), Start(W, res), switch, 8, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        twin.A.normal_(0, 3.0, generator=torch.Generator().manual_seed(4))
        twin.s.mul_(1.013)
    x = torch.randn(5, W.shape[1], generator=torch.Generator().manual_seed(2))
    switch.on = True
    ours = twin(x)  # grad enabled: the checkpointed path
    merged = twin.merged()
    assert torch.equal(ours.detach(), QuantLinear.from_quantized(merged, None, torch.float32, None)(x))
    assert int((merged.codes != res.qweight.codes).sum()) > 10


def test_lr_factor_warms_up_then_decays() -> None:
    assert lr_factor(0, 10, 4, "cosine") == 0.0 and lr_factor(1, 10, 4, "cosine") == pytest.approx(0.25)
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(7, 10, 4, "cosine") < lr_factor(5, 10, 4, "cosine")


# ---------------------------------------------------------------- one step on stories260K


@pytest.fixture(scope="module")
def stories_model(stories_dir: Path, require: Callable[[object, str], None]) -> tuple[Any, ...]:
    require(stories_dir.is_dir(), "../shared/models/stories260K")
    model, _, table, _ = load_float_model(stories_dir)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, table, ids, 2, "cpu")
    return model, table, ids, inputs


def _twins(stories_dir: Path, method: str, s: Settings) -> tuple[Any, ...]:
    """stories260K with every block linear rounded by ``method``'s start and replaced by its twin."""
    model, _, table, _ = load_float_model(stories_dir)
    trainer = {"disc": DiscTrainer, "lrqat": LrQatTrainer}[method]()
    scheme = WeightScheme(bits=3 if method == "disc" else 4, strategy="group", group_size=32)
    switch, twins = Switch(), []
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in range(len(get_module(model, table.blocks))):
        for n in table.linears:
            name = f"{table.blocks}.{i}.{n}"
            W = get_module(model, name).weight.data
            start = disc_start(W, None, scheme, Precision(), RoundingOptions(start="rtn")) if method == "disc" else \
                lrqat_start(W, None, scheme.for_layer(W.shape[1]), Precision())
            twin = trainer.wrap(_quantlinear(W, start), Start(W, start), switch, s, gen)
            set_module(model, name, twin)
            twins.append(twin)
    return model, table, trainer, twins, switch


def test_one_disc_step_lowers_its_objective(stories_dir: Path, stories_model: tuple[Any, ...]) -> None:
    """With the clamp out of the way the edited gradient is that of ``rho KL / delta^2 - <c, x>``: one small step
    lowers it on the batch it was computed on."""
    _, _, ids, inputs = stories_model
    s = _settings("disc", init="random", clamp=1e9, lr=1e-3, rho=1.0)
    model, table, trainer, twins, switch = _twins(stories_dir, "disc", s)
    distiller = _Distiller(model, table, switch, "kl")
    opt = trainer.optimizer(twins, s)

    def objective() -> float:
        kl = distiller.loss(inputs.hidden[0], inputs.kwargs[0], ids, backward=False)
        return s.rho * kl / trainer.delta2 - sum(float((t.c.float() * t.x.detach()).sum()) for t in twins)

    before = objective()
    distiller.loss(inputs.hidden[0], inputs.kwargs[0], ids, backward=True)
    trainer.before_step(twins, s)
    opt.step()
    trainer.after_step(twins)
    assert objective() < before
    assert all(float(t.x.detach().min()) >= 0 and float(t.x.detach().max()) <= 1 for t in twins)


def test_one_lrqat_step_lowers_the_loss(stories_dir: Path, stories_model: tuple[Any, ...]) -> None:
    _, _, ids, inputs = stories_model
    s = _settings("lrqat", lr=1e-4, scale_lr=1e-6)  # Adam's first step moves every variable by lr: keep it small
    model, table, trainer, twins, switch = _twins(stories_dir, "lrqat", s)
    distiller = _Distiller(model, table, switch, "kl")
    opt = trainer.optimizer(twins, s)
    before = distiller.loss(inputs.hidden[0], inputs.kwargs[0], ids, backward=True)
    assert all(t.A.grad is not None and t.s.grad is not None for t in twins)
    trainer.before_step(twins, s)
    opt.step()
    after = distiller.loss(inputs.hidden[0], inputs.kwargs[0], ids, backward=False)
    assert after < before


# ---------------------------------------------------------------- the pipeline


def _recipe(method: str, steps: int, **training: Any) -> Recipe:
    return recipe_from_dict({
        "name": f"t-{method}", "weights": {"bits": 4 if method == "lrqat" else 3, "group_size": 32},
        "method": method, "rounding": {"order": "gar", "static_groups": False, "mse_clip": True},
        "training": {"steps": steps, "batch": 2, "seqlen": 32, "warmup": 0, **training}})


def _run(stories_dir: Path, recipe: Recipe | str, out: Path) -> Any:
    return quantize_model(stories_dir, recipe, out, samples=8, calib_seqlen=32, seed=0, progress=False)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_disc_with_zero_steps_writes_the_gptq_checkpoint(stories_dir: Path, tmp_path: Path) -> None:
    disc = _run(stories_dir, _recipe("disc", 0), tmp_path / "disc")
    plain = {k: v for k, v in _recipe("disc", 0).to_dict().items() if k != "training"}
    ref = _run(stories_dir, recipe_from_dict({**plain, "method": "gptq"}), tmp_path / "gptq")
    a, b = _tensors(tmp_path / "disc"), _tensors(tmp_path / "gptq")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert disc.extra["trained_rounding"]["codes_changed"] == 0
    assert ref.extra.get("trained_rounding") is None


@pytest.mark.parametrize("method", ["disc", "lrqat"])
def test_trained_checkpoints_are_plain_and_reproducible(method: str, stories_dir: Path, tmp_path: Path) -> None:
    """Two runs give the same bytes; the checkpoint is an ordinary pack-quantized one (no extra tensors, the
    recipe's scheme) whose codes differ from the start; the report has the losses and settings."""
    recipe = _recipe(method, 3, **({"init": "random"} if method == "disc" else {"lr": 1.0}))
    res = _run(stories_dir, recipe, tmp_path / "a")
    _run(stories_dir, recipe, tmp_path / "b")
    for f in ("model.safetensors", "config.json", "quantize_report.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and "transform_config" not in config
    tensors = _tensors(tmp_path / "a")
    assert all(k.endswith(("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")) for k in tensors
               if "_proj" in k)
    report = json.loads((tmp_path / "a" / "quantize_report.json").read_text())["trained_rounding"]
    assert report["method"] == method and len(report["losses"]) == 3 and report["settings"]["steps"] == 3
    assert report == res.extra["trained_rounding"]
    assert all(l.output_rel_err > 0 for l in res.layers)
    assert res.extra["trained_rounding"]["codes_changed"] > 0.01


@pytest.mark.requires(__import__("importlib").util.find_spec("compressed_tensors") is not None, "compressed-tensors")
@pytest.mark.parametrize("method", ["disc", "lrqat"])
def test_trained_checkpoints_load_in_transformers(method: str, stories_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import lowbit

    res = _run(stories_dir, _recipe(method, 2, **({"init": "random"} if method == "disc" else {"lr": 1.0})), tmp_path / "q")
    assert res.extra["trained_rounding"]["codes_changed"] > 0.01
    ours = lowbit.load(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["disc", "lrqat"])
def test_training_through_quantized_activations_and_kv_cache(method: str, stories_dir: Path, tmp_path: Path) -> None:
    """The checkpointed blocks are recomputed in the backward pass with the KV quantizer as in the forward pass."""
    data = {**_recipe(method, 2, **({"init": "random"} if method == "disc" else {})).to_dict(),
            "activations": {"bits": 8}, "kv_cache": {"bits": 8, "strategy": "token"}}
    res = _run(stories_dir, recipe_from_dict(data), tmp_path / "q")
    assert len(res.extra["trained_rounding"]["losses"]) == 2


def test_presets_are_trained_integer_recipes() -> None:
    for name in ("w3a16-disc", "w4a16-disc", "w2a16-disc", "w3a16-rot-disc", "w4a16-lrqat"):
        r = PRESETS[name]
        assert r.method in ("disc", "lrqat") and r.weights.group_size == 64 and r.weights.is_plain_int
    assert PRESETS["w2a16-disc"].weights.bits == 2 and not PRESETS["w2a16-disc"].weights.symmetric


@pytest.mark.parametrize("data, message", [
    ({"method": "disc", "weights": {"format": "float", "bits": 4, "fp": "e2m1", "group_size": 32, "scale_format": "e8m0"}}, "int grid"),
    ({"method": "lrqat", "weights": {"bits": 4, "symmetric": False}}, "symmetric"),
    ({"method": "disc", "training": {"steps": -1}}, "training.steps"),
    ({"method": "disc", "training": {"lr": 0}}, "training.lr"),
    ({"method": "disc", "training": {"loss": "mse"}}, "training.loss"),
    ({"method": "disc", "training": {"init": "zeros"}}, "training.init"),
    ({"method": "disc", "rounding": {"start": "awq"}}, "rounding start"),
    ({"method": "disc", "training": {"rank": "8"}}, "training.rank"),
    ({"method": "gptq", "training": {"steps": 8}}, "training options apply to disc, lrqat"),
])
def test_bad_training_recipes_fail_before_loading(data: dict[str, Any], message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        recipe_from_dict({"name": "bad", **data})


def test_ctrl_c_during_rounding_training_leaves_nothing_written(tmp_path: Path, stories_dir: Path,  # type: ignore[no-untyped-def]
                                                               interrupt_while_training) -> None:
    interrupt_while_training(stories_dir, tmp_path, _recipe("disc", 2000).to_dict(), "disc",
                             ["--samples", "4", "--calib-seqlen", "32"])
