"""GPTQ: column-by-column rounding with optimal compensation of the not-yet-quantized columns.

A pure function of (W, H, scheme, options), following IST-DASLab's ``fasterquant`` (ALGORITHMS.md §1.3)
with GPTQModel's robust Cholesky (§1.6). Codes are written at each column's natural index and group
scales belong to natural groups, so the checkpoint needs no runtime permutation whatever the order:

* "actorder" + static groups: scales from the original W, columns in descending ``diag(H)``;
* "gar" (group-aware reordering): groups by their largest ``diag(H)``, columns inside a group likewise;
  a group's columns stay contiguous, so its scale can be computed when GPTQ reaches it (static_groups
  False), from weights that already carry the earlier columns' compensation;
* "natural": the reference order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from lowbit.formats.grid import GridParams, compute_params, dequantize_values, round_values
from lowbit.formats.int import compute_qparams, expand_groups, mse_clip
from lowbit.formats.precision import Precision
from lowbit.formats.scheme import WeightScheme
from lowbit.native import gptq_columns
from lowbit.quantize.options import RoundingOptions
from lowbit.quantize.refit import refit_group_scales
from lowbit.quantize.rounding import RoundResult, register_rounder, start_positions
from lowbit.quantize.rtn import from_values, rtn, rtn_weight

DAMP_STEP = 0.01  # GPTQModel's damp_auto_increment
FLOOR_TRIES = 6  # diagonal floors 1e-6 .. 1e-1 of max|diag H|


def column_order(diag: torch.Tensor, group_size: int, order: str) -> torch.Tensor:
    """Processing order of the ``in`` columns (a permutation, int64 ``[in]``) from ``diag(H)`` ``[in]``."""
    n = diag.numel()
    if order == "natural":
        return torch.arange(n)
    if order == "actorder" or group_size >= n:
        return torch.argsort(diag, descending=True, stable=True)
    groups = diag.view(n // group_size, group_size)  # [G, g]
    group_rank = torch.argsort(groups.amax(dim=1), descending=True, stable=True)
    inner = torch.argsort(groups, dim=1, descending=True, stable=True)  # [G, g]
    return (group_rank[:, None] * group_size + inner[group_rank]).reshape(-1)


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, str | None]:
    """Upper Cholesky factor ``U`` of ``(H + damping)^-1`` (float32 ``[in, in]``), robustly.

    Tries the relative damping ``damp * mean(diag H)``, raising it by 0.01 while Cholesky fails; then the
    same again on top of a diagonal floor of 1e-6 .. 1e-1 of ``max(diag H)``. Returns (None, reason)
    when everything fails, else (U, a note if anything beyond the plain damping was needed).
    """
    max_diag = float(H.diagonal().abs().max())
    # At most three [in, in] matrices besides H at any time (the damped copy, then L, then the inverse and U): a 5632
    # wide down_proj's factorisation is 127 MB a matrix, which sets the peak memory of a 1B model's block.
    for k in range(FLOOR_TRIES + 1):
        diag = H.diagonal()
        if k:
            f = 1e-6 * max(max_diag, 1e-12) * 10 ** (k - 1)
            diag = (H.diagonal() + f).clamp_min(f)
        mean_diag = float(diag.mean())
        d = damp
        while d < 1:
            A = H.clone()
            A.diagonal().copy_(diag + d * mean_diag)
            L, info = torch.linalg.cholesky_ex(A)
            del A
            if int(info) == 0:
                inverse = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                if int(info) == 0 and bool(torch.isfinite(U).all()):
                    note = None
                    if k or d > damp:
                        note = f"Hessian not positive definite: damping {d:.2f}" + (f", diagonal floor 1e-{7 - k}·max" if k else "")
                    return U, note
            d = round(d + DAMP_STEP, 6)
    return None, "Hessian could not be factorised at any damping"


def _group_params(
    cols: torch.Tensor, scheme: WeightScheme, precision: Precision, options: RoundingOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point ``[out, 1]`` of one group of columns ``[out, g]``."""
    per_row = scheme.per_row()
    clip = 1.0
    if options.mse_clip:
        clip = mse_clip(cols, per_row, precision, options.clip_grid, options.max_shrink, options.clip_norm, options.clip_stride)
    return compute_qparams(cols, per_row, precision.scale_dtype, clip)


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run the body with torch's intra-op pool at ``n`` threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_rounder("gptq", needs_hessian=True)
def gptq(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scheme: WeightScheme,
    precision: Precision = Precision(),
    options: RoundingOptions | None = None,
    positions: bool = False,
) -> RoundResult:
    """Quantize ``W [out, in]`` with GPTQ given ``H = X^T X / n`` (float32 ``[in, in]``); every weight is
    compensated for the error of its value as stored and run (``precision``). With ``positions`` (plain int grids)
    the result also holds the compensated weight each code was rounded from (the start of DiscQuant).

    Never raises on a bad Hessian: damping is escalated, then a diagonal floor is added, and if the
    factorisation still fails (or the loss is not finite) the layer falls back to RTN; ``note`` says so.
    """
    options = options or RoundingOptions()
    if H is None:
        raise ValueError("gptq needs the input Hessian H")
    threads = torch.get_num_threads()
    # torch's intra-op pool at one thread outside the large products: the loop's torch ops are too small to
    # share, and with the cores busy (another job, or the OpenMP pool of a second process) two threads
    # oversubscribe them (BENCHMARKS.md, 2026-11-23, code of 1b8ee2c). The C column loop uses ``threads`` row
    # slices of its own (native/gptq_columns.py).
    with _num_threads(1):
        return _gptq(W, H, scheme.for_layer(W.shape[1]), precision, options, threads, positions)


def _gptq(
    W: torch.Tensor, H: torch.Tensor, scheme: WeightScheme, precision: Precision, options: RoundingOptions,
    threads: int = 1, positions: bool = False,
) -> RoundResult:
    """The body of :func:`gptq` (scheme already resolved for the layer); the scale refit's large dense products run
    on ``threads`` intra-op threads (the caller's count), the rest, the factorisation included, on one.

    Everything that depends on H alone (dead columns, order, damping, the inverse factor U) is done once;
    the column loop then runs on all rows at once: in C on ``threads`` row slices (a row's codes, scales
    and loss depend only on that row, and the C call releases the GIL), or in torch on one thread (there
    two threads contend for the GIL and are slower: BENCHMARKS.md, 2026-11-29, code of fbfe5ce).
    """
    out_f, in_f = W.shape
    W = W.float().clone()
    H = H.float()
    dead = H.diagonal() == 0  # inputs that were always zero: any weight is fine, use 0
    if bool(dead.any()):  # a copy only then: H is the caller's, and a 1B model's is 127 MB
        H = H.clone()
        H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = scheme.columns_per_scale(in_f) if scheme.strategy != "tensor" else in_f
    perm = column_order(H.diagonal(), gs, options.order)
    # On one thread: LAPACK's Cholesky and inverse give other bits on two threads than on one, and the output must
    # not depend on the thread count (tests/quantize/test_scale.py); GEMMs, below and in the refit, do not.
    U, note = inverse_hessian_factor(H[perm[:, None], perm], options.damp)
    if U is None:
        return _fallback(W, scheme, precision, options, f"{note}: fell back to RTN", positions)

    # Static parameters come from the whole weight (grids other than plain int have tensor-wide or
    # per-row parts, so their groups are always static); on-the-fly group scales come from the loop.
    static = options.static_groups or scheme.strategy != "group" or not scheme.is_plain_int
    params = None
    if static:
        search = options.mse_clip and scheme.is_plain_int
        clip = mse_clip(W, scheme, precision, options.clip_grid, options.max_shrink, options.clip_norm, options.clip_stride) if search else 1.0
        params = compute_params(W, scheme, precision.scale_dtype, clip)

    want = positions and scheme.is_plain_int
    values, params, loss, residual = _column_loop(W, U, perm, scheme, precision, options, params, threads, residual=want)
    total = float(loss.sum())
    if not torch.isfinite(torch.tensor(total)):
        return _fallback(W, scheme, precision, options, "GPTQ loss not finite: fell back to RTN", positions)
    where = None
    if residual is not None:  # the compensated weight each code was rounded from, in units of the grid it was rounded on
        where = start_positions(values, values + residual / expand_groups(params.scale, in_f))
    del residual
    if options.refit_scales and scheme.is_plain_int and scheme.strategy in ("group", "channel"):
        with _num_threads(threads):
            params = GridParams(refit_group_scales(W, H, values, params.scale, params.zero, precision.scale_dtype), params.zero)
    return RoundResult(from_values(values, params, scheme, precision), total, note, loss, where)


def _fallback(W: torch.Tensor, scheme: WeightScheme, precision: Precision, options: RoundingOptions, note: str,
              positions: bool) -> RoundResult:
    """RTN in GPTQ's place (the Hessian could not be used), with its positions when asked for."""
    res = rtn(W, None, scheme, precision, options, positions=positions)
    return RoundResult(res.qweight, None, note, None, res.positions)


def _column_loop(
    W: torch.Tensor,
    U: torch.Tensor,
    perm: torch.Tensor,
    scheme: WeightScheme,
    precision: Precision,
    options: RoundingOptions,
    params: GridParams | None,
    threads: int = 1,
    native_loop: bool = True,
    residual: bool = False,
) -> tuple[torch.Tensor, GridParams, torch.Tensor, torch.Tensor | None]:
    """GPTQ's column loop on rows ``W [rows, in]`` (float32, natural column order) with the upper inverse
    factor ``U [in, in]`` in processing order ``perm``, on static grid ``params`` of these rows, or with
    plain-int group scales computed on the fly when ``params`` is None. Returns (grid values float32
    ``[rows, in]`` at natural indices (formats/grid.py), the parameters, loss per row float32 ``[rows]``, and with
    ``residual`` float32 ``[rows, in]`` each compensated weight minus its dequantized value ``w' - w_hat``, else None).

    Each block's columns run in C on ``threads`` row slices (native/gptq_columns.py: the same bits,
    without torch's per-op dispatch, which set the torch loop's speed) for the plain int grid when the
    kernel could be built and ``native_loop``; otherwise in torch (:func:`_block_torch`)."""
    out_f, in_f = W.shape
    gs = scheme.columns_per_scale(in_f) if scheme.strategy != "tensor" else in_f
    static = params is not None
    if params is not None:
        scale, zero = params.scale, params.zero  # [out|1, G]
    else:
        scale = torch.empty(out_f, in_f // gs, device=W.device)
        zero = None if scheme.symmetric else torch.empty(out_f, in_f // gs, dtype=torch.int8, device=W.device)
    # Blocks hold whole groups when group scales are computed on the fly, so a group's up-to-date
    # weights are all inside the current block copy W1T (ALGORITHMS.md §1.6, the intra-block pitfall).
    B = options.block_size if static else max(gs, options.block_size // gs * gs)

    order = perm.tolist()
    generic = params is not None and not scheme.is_plain_int
    use_native = not generic and native_loop and W.device.type == "cpu" and gptq_columns.available(precision.dtype)
    Wp = W[:, perm]  # [rows, in] in processing order
    if static:  # per-column scale / zero in processing order, from each column's natural group: [rows, in]
        s_all = expand_groups(scale, in_f)[:, perm].expand(out_f, -1)
        z_all = None if zero is None else expand_groups(zero, in_f)[:, perm].float().expand(out_f, -1)
    codes = torch.empty(out_f, in_f, device=W.device)  # grid values (formats/grid.py), at natural column indices
    loss = torch.zeros(out_f, device=W.device)
    resid = torch.empty(out_f, in_f, device=W.device) if residual else None  # w' - w_hat: scaled error times U's diagonal

    def start_group(W1T: torch.Tensor, i: int, i1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On-the-fly scale (and zero) ``[rows]`` of the group starting at block column ``i``, from the
        compensated weights ``W1T[i : i + gs]``; stored into ``scale`` / ``zero`` at the natural group."""
        g = order[i1 + i] // gs
        s_g, z_g = _group_params(W1T[i : i + gs].t().contiguous(), scheme, precision, options)
        scale[:, g] = s_g[:, 0]
        if zero is not None:
            zero[:, g] = z_g[:, 0]
        return scale[:, g], (None if zero is None else zero[:, g].float())

    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        # The block's columns as rows (W1T [i2 - i1, rows]): each column is contiguous, and so is each
        # rank-1 update below (faster than on [rows, cols] for the same arithmetic: BENCHMARKS.md, 2026-11-28,
        # code of d6d3c68).
        W1T, U1 = Wp[:, i1:i2].t().contiguous(), U[i1:i2, i1:i2]
        if static:
            s_cols, z_cols = s_all[:, i1:i2], (None if z_all is None else z_all[:, i1:i2])
        if use_native:  # the same arithmetic in C (native/gptq_columns.py), bit for bit
            Q, E = torch.empty_like(W1T), torch.empty_like(W1T)
            U1c = U1.contiguous()
            if static:
                S = s_cols.t().contiguous()
                Z = None if z_cols is None else z_cols.t().contiguous()
                gptq_columns.gptq_columns(W1T, U1c, 0, i2 - i1, S, Z, scheme.qmin, scheme.qmax, precision.dtype, Q, E, threads)
            else:
                for i in range(0, i2 - i1, gs):  # blocks hold whole groups here
                    s_g, z_g = start_group(W1T, i, i1)
                    gptq_columns.gptq_columns(W1T, U1c, i, i + gs, s_g.contiguous(), None if z_g is None else z_g.contiguous(),
                                              scheme.qmin, scheme.qmax, precision.dtype, Q, E, threads)
            Q1, E1 = Q.t(), E.t().contiguous()  # [rows, i2 - i1]
        else:
            Q1, E1 = _block_torch(W1T, U1, i1, s_cols if static else None, z_cols if static else None,
                                  params if generic else None, scheme, precision, gs, start_group)
        codes[:, perm[i1:i2]] = Q1
        if resid is not None:
            resid[:, perm[i1:i2]] = E1 * U1.diagonal()
        loss += E1.square().sum(dim=1) / 2  # sum (w - q)^2 / d^2 / 2
        Wp[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy update of all later columns
    return codes, params if params is not None else GridParams(scale, zero), loss, resid


def _block_torch(
    W1T: torch.Tensor, U1: torch.Tensor, i1: int, s_cols: torch.Tensor | None, z_cols: torch.Tensor | None,
    params: GridParams | None, scheme: WeightScheme, precision: Precision, gs: int,
    start_group: "Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor | None]]",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one block in torch (the reference for native/gptq_columns.py, and the path of
    grids other than plain int): columns of ``W1T [nb, rows]`` (the block transposed, updated in place)
    with the block ``U1 [nb, nb]`` of the factor; per-column static ``s_cols`` / ``z_cols [rows, nb]``, or
    None for on-the-fly groups (``start_group`` computes them); ``params`` set for a generic grid.
    Returns grid values and scaled errors, float32 ``[rows, nb]`` each."""
    diag = U1.diagonal().tolist()  # Python floats: on the CPU, dividing by one is bit-identical to a 0-d tensor
    qs: list[torch.Tensor] = []  # this block's grid values and scaled errors, column by column
    errs: list[torch.Tensor] = []
    for i in range(W1T.shape[0]):
        w = W1T[i]
        if params is not None:  # any grid, through formats/grid.py
            col = GridParams(s_cols[:, i : i + 1], None if z_cols is None else z_cols[:, i : i + 1],
                             params.global_scale, params.channel_scale)
            q = round_values(w[:, None], col, scheme)
            dq = dequantize_values(q, col, scheme, None, precision.dtype)[:, 0]
            q = q[:, 0]
        else:  # the plain int grid inline: as few ops as possible
            if s_cols is not None:
                s, z = s_cols[:, i], (None if z_cols is None else z_cols[:, i])
            else:
                if (i1 + i) % gs == 0:  # a group starts: its scale from the compensated weights
                    s_group, z_group = start_group(W1T, i, i1)
                s, z = s_group, z_group
            q = torch.div(w, s).round_()
            if z is not None:
                q.add_(z)
            q.clamp_(scheme.qmin, scheme.qmax)
            dq = (q if z is None else q - z) * s
            if precision.dtype != torch.float32:
                dq = dq.to(precision.dtype).float()  # exactly what dequantize gives
        qs.append(q)
        err = (w - dq).div_(diag[i])
        errs.append(err)
        W1T[i:].sub_(torch.outer(U1[i, i:], err))
    return torch.stack(qs, dim=1), torch.stack(errs, dim=1)
