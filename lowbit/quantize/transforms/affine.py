"""AffineQuant (ALGORITHMS.md 3): block-wise output matching with learned equivalent transforms and weight clipping.

For one decoder block this learns

* per pre-norm a diagonal scale ``s`` (the LET vectors of the Llama-2 scripts): the norm gain is divided by it and
  the columns of the linears that read the norm are multiplied by it;
* per KV head a full ``head_dim x head_dim`` matrix ``A^h`` between v_proj and o_proj, used through the gradual band
  mask (3.3) and kept strictly diagonally dominant, hence invertible (Levy-Desplanques);
* per linear one clip factor per scale group, ``sigmoid(gamma)`` (LWC), for the weight fake-quant,

so that the fake-quantized block run on the quantized stream ``q_in`` reproduces the float block's outputs ``fp_out``
(MSE). At the end every transform is folded into the block's weights and norm gains: the float block computes what it
computed before, up to one rounding of each weight, and nothing stays online.

Algebra (torch layout ``W[out, in]``, x a row vector, ``y = x W^T``):

* norm: ``gamma' = gamma / s`` makes the norm output ``x / s``, and ``W' = W diag(s)`` gives ``(x / s) W'^T = x W^T``.
* v -> o, with ``M = Ã^{-1}`` (the reference's convention): KV head h's value becomes ``v_h' = v_h M``, that is
  ``W_v^h' = M^T W_v^h = Ã^{-T} W_v^h`` (its ``head_dim`` rows; a bias ``b' = b Ã^{-1}``). Attention mixes tokens
  with the probabilities P and never channels, so every query head reading KV head h outputs ``P v_h M``, and
  o_proj's columns of that query head undo M: ``W_o^q' = W_o^q M^{-T} = W_o^q Ã^T``. With grouped-query attention,
  query head ``q`` reads KV head ``q // (heads / kv_heads)`` (transformers' repeat_kv), so one ``Ã^h`` multiplies the
  o_proj columns of all ``heads / kv_heads`` query heads of its group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.formats.int import compute_qparams, fake_quantize_ste
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import ActScheme, WeightScheme
from lowbit.kernels.online import input_transform
from lowbit.kernels.quant_linear import fake_quantize_activation
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.attention import kv_cache_mode
from lowbit.models.loading import get_module
from lowbit.calibrate.runner import BlockInputs, map_tensors
from lowbit.quantize.transforms.base import BLOCK_TRAINED, TrainContext, device_defaults, register
from lowbit.quantize.transforms.smoothquant import migration_scales

EPS = 1e-5  # floor of |s| (the init clamp of 3.4) and of |a_ii|: a zero would make the fold divide by zero
DOMINANCE_MARGIN = 0.05  # off-diagonal row sums are kept <= (1 - margin) |a_ii|, away from singular
LWC_INIT = 4.0  # sigmoid(4) = 0.982: training starts just inside the full range


@dataclass(frozen=True)
class AffineSettings:
    """Training settings: ``epochs`` passes over the calibration batches, AdamW learning rates of the transforms
    (``lr``) and of the clip logits (``lwc_lr``), the stability factor ``sf`` of the mask's off-diagonals
    (``stability``) and the migration strength ``alpha`` of the scale init."""

    epochs: int = 20
    lr: float = 5e-3
    lwc_lr: float = 1e-2
    stability: float = 1e-2  # sf
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise LowbitError(f"affine epochs must be a positive int, got {self.epochs!r}")
        if not (self.lr > 0 and self.lwc_lr > 0):
            raise LowbitError(f"affine learning rates must be positive, got lr={self.lr!r}, lwc_lr={self.lwc_lr!r}")
        if not 0.0 <= self.stability <= 1.0:
            raise LowbitError(f"affine stability factor must be in [0, 1], got {self.stability!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"affine alpha must be in [0, 1], got {self.alpha!r}")


@dataclass
class AffineResult:
    """What one block's training gave: per-epoch mean MSE and the learned clip factors per linear (``[out, G]``
    float32 in (0, 1], relative to the folded weight; ``[1, 1]`` for a per-tensor scheme)."""

    loss_first: float
    loss_last: float
    losses: list[float] = field(default_factory=list)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)


def gradual_mask(D: int, e: int, E: int, sf: float) -> torch.Tensor:
    """The band mask of epoch ``e`` of ``E`` (3.3): float32 ``[D, D]``, 1 on the diagonal, ``sf`` on the
    ``n_e - 1`` diagonals each side of it, 0 beyond, with ``n_e = floor((D - 1) e / (E - 1)) + 1``.
    Epoch 0 keeps the diagonal only, the last epoch the full matrix; ``E = 1`` (no growth possible) the diagonal."""
    n_e = 1 if E == 1 else (D - 1) * e // (E - 1) + 1
    idx = torch.arange(D)
    dist = (idx[:, None] - idx[None, :]).abs()
    return torch.where(dist == 0, 1.0, torch.where(dist < n_e, sf, 0.0)).float()


def make_dominant(A: torch.Tensor, mask: torch.Tensor, margin: float = DOMINANCE_MARGIN) -> torch.Tensor:
    """Project ``A [..., n, n]`` so that ``Ã = A * mask`` is strictly diagonally dominant by rows:
    ``sum_{j != i} |Ã_ij| <= (1 - margin) |a_ii| < |a_ii|``.

    A row that violates it has its off-diagonal entries scaled down (all of them, so that entries outside the current
    band keep their proportions for later epochs); a diagonal entry smaller than EPS in magnitude is raised to EPS with
    its sign (0 -> +EPS). Rows that already satisfy it are returned unchanged. Same shape and dtype as ``A``.
    """
    eye = torch.eye(A.shape[-1], dtype=torch.bool, device=A.device)
    diag = A.diagonal(dim1=-2, dim2=-1)  # [..., n]
    diag = torch.where(diag < 0, -1.0, 1.0).to(A.dtype) * diag.abs().clamp_min(EPS)
    off = (A * mask).abs().masked_fill(eye, 0.0).sum(-1)  # [..., n]
    limit = (1.0 - margin) * diag.abs()
    factor = torch.where(off > limit, limit / off.clamp_min(torch.finfo(A.dtype).tiny), torch.ones_like(off))
    return torch.where(eye, torch.diag_embed(diag), A * factor[..., None])


def _floor_magnitude(s: torch.Tensor) -> torch.Tensor:
    """``s`` with entries of magnitude < EPS replaced by ``sign(s) EPS`` (0 -> +EPS), straight-through."""
    floored = torch.where(s < 0, -1.0, 1.0) * s.abs().clamp_min(EPS)
    return s + (floored - s).detach()


def equivalent_weights(
    params: dict[str, torch.Tensor], table: ArchTable, geometry: Geometry, s: dict[str, torch.Tensor],
    A_tilde: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The block's parameters with the transforms applied (module docstring), in the dtype of ``params``.

    Args:
        params: every parameter of the block by name (``self_attn.v_proj.weight``...), one float dtype.
        s: per norm path, its scale ``[hidden]`` (nonzero).
        A_tilde: the masked v -> o matrices ``[kv_heads, head_dim, head_dim]`` (invertible).

    Returns a new dict: changed entries are new tensors, the others the same objects (differentiable in s, A_tilde).
    """
    new = dict(params)
    for norm, readers in table.norms:
        gain = f"{norm}.{table.norm_gain}"
        new[gain] = params[gain] / s[norm]
        for r in readers:
            new[f"{r}.weight"] = params[f"{r}.weight"] * s[norm]  # column j times s_j
    kv, d, g = geometry.kv_heads, geometry.head_dim, geometry.heads // geometry.kv_heads
    W_v = new[f"{table.value}.weight"]  # [kv * d, D], already column-scaled (left and right factors commute)
    b_v = params.get(f"{table.value}.bias")
    Wb = W_v if b_v is None else torch.cat([W_v, b_v[:, None]], dim=1)  # the bias transforms like a column
    Wb = torch.linalg.solve(A_tilde.transpose(-1, -2), Wb.reshape(kv, d, -1)).reshape(kv * d, -1)  # Ã^{-T} W_v^h
    new[f"{table.value}.weight"] = Wb[:, : W_v.shape[1]]
    if b_v is not None:
        new[f"{table.value}.bias"] = Wb[:, -1]
    W_o = params[f"{table.out}.weight"]  # [D, heads * d], column (h g + r) d + i: query head h g + r, channel i
    W_o4 = W_o.reshape(W_o.shape[0], kv, g, d)  # [D, kv, g, d]
    new[f"{table.out}.weight"] = torch.einsum("okrd,ked->okre", W_o4, A_tilde).reshape(W_o.shape)  # W_o^q Ã^T
    return new


@torch.no_grad()
def fold_affine(
    block: nn.Module, table: ArchTable, geometry: Geometry, s: dict[str, torch.Tensor], A_tilde: torch.Tensor
) -> None:
    """Fold the transforms into ``block``'s weights and norm gains in place: products in float64, each tensor
    rounded once to its own dtype, so the float block's outputs are unchanged up to that rounding."""
    params = {n: p.detach().double() for n, p in block.named_parameters()}
    s64 = {k: v.detach().double() for k, v in s.items()}
    new = equivalent_weights(params, table, geometry, s64, A_tilde.detach().double())
    for n, p in block.named_parameters():
        if new[n] is not params[n]:
            p.copy_(new[n].to(p.dtype))


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)


@torch.no_grad()
def init_scales(
    block: nn.Module, table: ArchTable, params: dict[str, torch.Tensor], q_in: list[torch.Tensor],
    kwargs: list[dict[str, Any]], alpha: float,
) -> dict[str, torch.Tensor]:
    """3.4's init per norm, ``s_j = max|X_j|^alpha / max_o |W_oj|^(1 - alpha)`` clamped >= 1e-5 (float32 ``[D]``).

    X is the norm output on ``q_in`` (the quantized stream the block will see). The weight term is the absmax over
    the rows of *all* readers of the norm: the reference takes the signed max of the first reader only, which can
    be negative or miss the reader with the widest column.
    """
    x_max: dict[str, torch.Tensor] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            x_max[name] = m if name not in x_max else torch.maximum(x_max[name], m)
        return hook

    handles = [get_module(block, norm).register_forward_hook(record(norm)) for norm, _ in table.norms]
    try:
        for h, kw in zip(q_in, kwargs):
            functional_call(block, params, (h,), kw)
    finally:
        for handle in handles:
            handle.remove()
    s = {}
    for norm, readers in table.norms:
        w_max = torch.stack([params[f"{r}.weight"].abs().amax(0) for r in readers]).amax(0)
        s[norm] = migration_scales(x_max[norm].double(), w_max.double(), alpha).float()
    return s


def affine_block(
    block: nn.Module, table: ArchTable, geometry: Geometry, q_in: list[torch.Tensor],
    kwargs: list[dict[str, Any]], fp_out: list[torch.Tensor], weights: WeightScheme,
    activations: ActScheme | None, settings: AffineSettings, progress: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> AffineResult:
    """Train AffineQuant's transforms and clip factors on one block, then fold the transforms into it in place.

    Args:
        block: a float decoder block (its weights are read, frozen while training, and rewritten by the fold).
        q_in: the student inputs, one ``[b, L, hidden]`` tensor per batch (outputs of the quantized earlier blocks).
        kwargs: the block's keyword arguments per batch (calibrate/runner.py ``BlockInputs.kwargs``).
        fp_out: the float block's outputs on the float stream, ``[b, L, hidden]`` per batch (the targets).
        weights: the weight grid (a plain int grid); the group size is resolved per linear (``for_layer``).
        activations: if given, each linear's input is fake-quantized (after its online input transform, if any).
        scale_dtype: storage dtype of the weight scales during training; None: ``Precision.of_model``'s default.

    Everything trains in float32; batches are taken in the order given, nothing is random, so runs repeat exactly.
    """
    if not weights.is_plain_int:
        raise LowbitError(f"AffineQuant trains through the int grid with float scales; {weights.name} is not one")
    if not q_in or len(q_in) != len(kwargs) or len(q_in) != len(fp_out):
        raise LowbitError(f"AffineQuant needs matching non-empty inputs, kwargs and targets, got "
                          f"{len(q_in)}, {len(kwargs)}, {len(fp_out)}")
    linears = {name: get_module(block, name) for name in table.linears}
    folded = {r for _, readers in table.norms for r in readers} | {table.value, table.out}
    for name, linear in linears.items():
        if input_transform(linear) is not None and name in folded:
            raise LowbitError(f"AffineQuant cannot fold into {name}: it has an online input transform")
        if activations is not None:
            activations.check_features(linear.weight.shape[1], name)
    dtype = next(block.parameters()).dtype
    scale_dtype = scale_dtype or Precision.of_model(dtype).scale_dtype
    device = linears[table.value].weight.device
    params = {n: p.detach().float() for n, p in block.named_parameters()}
    q_in = [h.float() for h in q_in]
    fp_out = [y.float() for y in fp_out]
    kwargs = [map_tensors(kw, lambda t: t.float() if t.is_floating_point() else t) for kw in kwargs]  # 16-bit RoPE tables
    schemes = {name: weights.for_layer(params[f"{name}.weight"].shape[1]) for name in linears}

    s = {k: nn.Parameter(v) for k, v in init_scales(block, table, params, q_in, kwargs, settings.alpha).items()}
    kv, d = geometry.kv_heads, geometry.head_dim
    A = nn.Parameter(torch.eye(d, device=device).repeat(kv, 1, 1))  # identity init: v -> o starts as a no-op
    gamma = {name: nn.Parameter(torch.full_like(compute_qparams(params[f"{name}.weight"], schemes[name])[0], LWC_INIT))
             for name in linears}  # one logit per scale group, [out, G]
    opt = torch.optim.AdamW([{"params": [*s.values(), A], "lr": settings.lr},
                             {"params": list(gamma.values()), "lr": settings.lwc_lr}], weight_decay=0.0)

    def quantize_input(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (fake_quantize_activation(args[0], activations, ste=True), *args[1:])

    def quantize_output(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(out, activations, ste=True)

    handles = []
    if activations is not None:  # quantize what the weight multiplies: after an online input transform, if any
        for linear in linears.values():
            t = input_transform(linear)
            handles.append(linear.register_forward_pre_hook(quantize_input) if t is None
                           else t.register_forward_hook(quantize_output))
    flags, mode = {n: p.requires_grad for n, p in block.named_parameters()}, block.training
    block.eval()
    for p in block.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    with kv_cache_mode(list(block.modules()), ste=True):  # a quantized KV cache: train through it
        try:
            bar = tqdm(range(settings.epochs), desc="affine", unit="epoch", disable=not progress)
            for e in bar:
                mask = gradual_mask(d, e, settings.epochs, settings.stability).to(device)
                with torch.no_grad():  # the band just grew: entries entering it must not break dominance
                    A.copy_(make_dominant(A, mask))
                total = torch.zeros((), device=device)
                for h, kw, y in zip(q_in, kwargs, fp_out):
                    new = equivalent_weights(params, table, geometry, {k: _floor_magnitude(v) for k, v in s.items()},
                                             A * mask)
                    for name in linears:
                        key = f"{name}.weight"
                        new[key] = fake_quantize_ste(new[key], schemes[name], scale_dtype, torch.sigmoid(gamma[name]))
                    loss = F.mse_loss(_output(functional_call(block, new, (h,), kw)), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        A.copy_(make_dominant(A, mask))
                    total += loss.detach()
                losses.append(total.item() / len(q_in))
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        finally:
            for handle in handles:
                handle.remove()
            for n, p in block.named_parameters():
                p.requires_grad_(flags[n])
            block.train(mode)
    fold_affine(block, table, geometry, {k: _floor_magnitude(v) for k, v in s.items()}, A * mask)
    clip = {name: torch.sigmoid(g.detach()) for name, g in gamma.items()}
    return AffineResult(losses[0], losses[-1], losses, clip)


# What 2 CPU cores can afford per block (SmolLM2: 30 blocks; BENCHMARKS.md), and the reference scripts' setting
# (ALGORITHMS.md 3.1: 20 epochs over all 128 windows, one window per step) for a GPU.
CPU_DEFAULTS = {"epochs": 4, "samples": 16, "batch": 2}
CUDA_DEFAULTS = {"epochs": 20, "samples": None, "batch": 1}


def rebatch(hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], targets: list[torch.Tensor], samples: int | None,
            batch: int) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[torch.Tensor]]:
    """The first ``samples`` windows (all if None) of per-batch ``[b, L, D]`` lists, cut into batches of ``batch``.

    Every window has the same length, so the block's keyword arguments of a new batch are those of the first
    batch cut to its size (the batch-sized tensors, such as RoPE tables, sliced; the rest shared)."""
    h, y = torch.cat(hidden), torch.cat(targets)  # [N, L, D]
    n = h.shape[0] if samples is None else min(samples, h.shape[0])
    b0 = hidden[0].shape[0]
    out_h, out_kw, out_y = [], [], []
    for s in range(0, n, batch):
        e = min(s + batch, n)
        out_h.append(h[s:e])
        out_y.append(y[s:e])
        out_kw.append(map_tensors(kwargs[0], lambda t, k=e - s: t[:k] if t.dim() and t.shape[0] == b0 else t))
    return out_h, out_kw, out_y


@register("affine", BLOCK_TRAINED, options=("epochs", "lr", "stability", "alpha", "samples", "batch"),
          description="AffineQuant: per block, norm-side scales and per-KV-head v->o matrices (gradual mask, "
                      "diagonally dominant) with learned clipping, trained to match the float block's output, folded")
def affine(block: nn.Module, table: ArchTable, geometry: Geometry, inputs: BlockInputs, fp_out: list[torch.Tensor],
           ctx: TrainContext, **options: Any) -> dict[str, Any]:
    """Train AffineQuant on one block (options left None take the device's defaults) and fold it; its report."""
    pick = device_defaults(options, ctx.device, CPU_DEFAULTS, CUDA_DEFAULTS)  # values checked by TransformSpec
    given = {k: options[k] for k in ("lr", "stability", "alpha") if options.get(k) is not None}
    settings = AffineSettings(epochs=pick["epochs"], **given)
    h, kw, y = rebatch(inputs.hidden, inputs.kwargs, fp_out, pick["samples"], pick["batch"])
    res = affine_block(block, table, geometry, h, kw, y, ctx.weights, ctx.activations, settings, ctx.progress)
    return {"losses": res.losses, "settings": {**dataclasses.asdict(settings), "samples": pick["samples"],
                                              "batch": pick["batch"]}}
