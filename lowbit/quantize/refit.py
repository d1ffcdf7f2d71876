"""Least-squares refit of group scales once the codes are fixed (after GPTQ).

GPTQ chooses each code with the scale known when its group starts; afterwards the codes are final but
the scales are free. For one output row ``w [in]`` with codes ``c = q - z`` and one scale ``s_a`` per group
``a``, the dequantized row is ``w_hat = C s`` where ``C [in, G]`` holds the group's codes in its column
block, and the layer's output error on the calibration inputs is ``(w - C s)^T H (w - C s)``
(``H = X^T X / n``). It is quadratic in ``s``, so the optimum solves the ``G x G`` system
``(C^T H C) s = C^T H w``, one per row. The refit is GPTQ's own objective, so it can only lower it; a
row keeps its old scales where the stored (rounded) new ones would not (or are not positive).
"""

from __future__ import annotations

import torch

from lowbit.formats.int import _store, group_view

RIDGE = 1e-4  # pull towards the old scales, relative to each group's curvature: a group of zero codes keeps its scale
REFIT_BYTES = 256 << 20  # the largest temporary, [rows, G, in] float32: rows are refit in chunks below it


def refit_group_scales(
    W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> torch.Tensor:
    """Scales minimising ``sum_o (w_o - w_hat_o)^T H (w_o - w_hat_o)`` for fixed codes.

    Args:
        W: float weight ``[out, in]`` (natural column order).
        H: float32 ``[in, in]``, the Hessian proxy ``X^T X / n`` without GPTQ's damping (the damping only
            conditions GPTQ's inverse; the error to minimise is the undamped one).
        codes: grid values float32 ``[out, in]`` (int codes, zero point included for asymmetric grids).
        scale: float32 ``[out, G]``, the scales the codes were chosen with (representable in ``scale_dtype``).
        zero: int8 ``[out, G]`` zero points or None (symmetric); they stay as they are.
        scale_dtype: storage dtype of the scales.

    Returns:
        float32 ``[out, G]`` scales, representable in ``scale_dtype``; per row either the refit or ``scale``.
    """
    out_f, in_f = W.shape
    G = scale.shape[1]
    rows = max(1, REFIT_BYTES // (4 * G * in_f))  # rows per chunk: Y below is [rows, G, in] float32
    return torch.cat([
        _refit_rows(W[o : o + rows], H, codes[o : o + rows], scale[o : o + rows],
                    None if zero is None else zero[o : o + rows], scale_dtype)
        for o in range(0, out_f, rows)
    ])


def _refit_rows(
    W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`refit_group_scales` on a chunk of rows (each row's problem is its own)."""
    out_f, in_f = W.shape
    G = scale.shape[1]
    g = in_f // G
    C = group_view(codes.float(), g)  # [o, G, g]
    if zero is not None:
        C = C - zero.float()[..., None]
    # M[o, a, b] = c_a^T H_ab c_b and r[o, a] = c_a^T (H w)_a, from Y[o, a, :] = c_a^T H[a rows, :]; the
    # products in float32 (the cost: out * in^2), the small systems and the comparison in float64
    Y = torch.einsum("oaj,ajk->oak", C, H.float().reshape(G, g, in_f))  # [o, G, in]
    M = torch.einsum("oabk,obk->oab", Y.view(out_f, G, G, g), C).double()  # [o, G, G]
    r = torch.einsum("oak,ok->oa", Y, W.float()).double()  # [o, G]
    s0 = scale.double()
    D = torch.diag_embed(M.diagonal(dim1=1, dim2=2) * RIDGE + 1e-30)
    s, info = torch.linalg.solve_ex(M + D, (r + (D @ s0[..., None])[..., 0])[..., None])
    s = s[..., 0]
    s_new = _store(s.float(), scale_dtype).double()  # rounded to storage: judge what will be stored

    def objective(x: torch.Tensor) -> torch.Tensor:  # [o]: x^T M x - 2 x^T r (+ w^T H w, the same for both)
        return (x[:, None, :] @ M @ x[..., None])[:, 0, 0] - 2 * (x * r).sum(dim=1)

    ok = (info == 0) & torch.isfinite(s).all(dim=1) & (s > 0).all(dim=1) & (objective(s_new) < objective(s0))
    return torch.where(ok[:, None], s_new, s0).float()
