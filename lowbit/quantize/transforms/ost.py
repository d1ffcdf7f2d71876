"""OSTQuant's learnable orthogonal and scaling transforms, and how they map onto a block's weights (ALGORITHMS.md 2.1).

Row convention as in rotations.py (``x' = x Q``; a torch weight ``W [out, in]`` that reads ``x'`` becomes ``W Q``,
one that writes into it ``Q^T W``). Starting from a model whose norm gains are folded (``fold_norms``), layer ``l``
of a Llama-type block gets:

* ``R1 [D, D]`` (one for the model): the residual stream ``h' = h R1``; readers (q, k, v, gate, up) ``W <- W R1``;
  writers (o, down) ``W <- R1^T W``; the embedding ``E <- E R1`` and lm_head ``W <- W R1``.
* ``s_attn``, ``s_mlp [D]``: the two norms' gains become ``s`` and their readers' columns are divided by it
  (``W <- W R1 diag(s)^-1``): the activation the readers quantize is ``norm(h') * s``.
* ``R2 [KV, d, d]``, ``s_ov [KV, d]``: each KV head's value ``v_h' = v_h R2_h diag(s_ov_h)`` (v_proj rows
  ``<- diag(s) R2^T W``), and o_proj's columns of every query head that reads KV head h ``<- W R2_h diag(s)^-1``
  (per-head mixing of v commutes with the attention probabilities).
* ``s_qk [KV, d/2]``: query head h (of KV group g) ``q_h' = q_h * u_g`` and key ``k_g' = k_g / u_g`` with ``u`` equal on
  the two channels of every RoPE pair (``u = [s, s]`` for the "half" layout), so RoPE commutes with it and
  ``q k^T`` is unchanged. Not learned where the table says the heads are normalised (Qwen3) or RoPE pairs are unknown.
* ``s_ud [I]``: up_proj rows ``<- diag(s)^-1 W`` and down_proj columns ``<- W diag(s)`` (down's input is linear in up).

The same function, :meth:`OstParams.block_weights`, gives the differentiable weights the training runs (float32)
and the fused weights written at the end (float64, rounded once), so what is trained is what is fused.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import hadamard_matrix, random_signs
from lowbit.models.arch import ArchTable, Geometry
from lowbit.models.loading import get_module
from lowbit.quantize.transforms.rotations import is_tied

INITS = ("hadamard", "womi")


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """``diag(s) H_n / sqrt(n)`` as a dense float64 ``[n, n]`` (rotations.py's random R1/R2, as a matrix)."""
    return random_signs(n, seed).double()[:, None] * hadamard_matrix(n, torch.float64)


def principal_axes(C: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the symmetric ``C [..., n, n]`` as columns, by decreasing eigenvalue (float64)."""
    _, U = torch.linalg.eigh(C.double())
    return U.flip(-1)


class OstParams(nn.Module):
    """The learned transforms of a model with ``n_layers`` blocks of ``geometry`` (see the module docstring).

    Parameters (rotations float64, so orthogonality does not drift; scales float32, all initialised to 1):
        R1: ``[D, D]``; R2: ``[n_layers, KV, d, d]``; s_attn, s_mlp: ``[n_layers, D]``; s_ov: ``[n_layers, KV, d]``;
        s_ud: ``[n_layers, I]``; s_qk: ``[n_layers, KV, d / 2]`` or None.
    """

    def __init__(self, geometry: Geometry, n_layers: int, table: ArchTable) -> None:
        super().__init__()
        D, I, KV, d = geometry.hidden, geometry.intermediate, geometry.kv_heads, geometry.head_dim
        self.geometry, self.table = geometry, table
        self.R1 = nn.Parameter(torch.eye(D, dtype=torch.float64))
        self.R2 = nn.Parameter(torch.eye(d, dtype=torch.float64).expand(n_layers, KV, d, d).clone())
        self.s_attn = nn.Parameter(torch.ones(n_layers, D))
        self.s_mlp = nn.Parameter(torch.ones(n_layers, D))
        self.s_ov = nn.Parameter(torch.ones(n_layers, KV, d))
        self.s_ud = nn.Parameter(torch.ones(n_layers, I))
        learn_qk = table.rope_pairs in ("half", "interleaved") and not table.qk_norm and d % 2 == 0
        self.s_qk = nn.Parameter(torch.ones(n_layers, KV, d // 2)) if learn_qk else None

    def rotations(self) -> list[nn.Parameter]:
        """The orthogonal parameters (for the Stiefel optimizer)."""
        return [self.R1, self.R2]

    def scales(self) -> list[nn.Parameter]:
        """The diagonal scalings (for Adam)."""
        return [p for p in (self.s_attn, self.s_mlp, self.s_ov, self.s_ud, self.s_qk) if p is not None]

    @torch.no_grad()
    def init_hadamard(self, seed: int) -> None:
        """R1 and every R2 a seeded random Hadamard (rotations.py's r1/r2 with ``random``)."""
        self.R1.copy_(random_hadamard(self.geometry.hidden, seed))
        self.R2.copy_(random_hadamard(self.geometry.head_dim, seed + 1).expand_as(self.R2))

    @torch.no_grad()
    def init_womi(self, model: nn.Module, seed: int) -> None:
        """WOMI (ALGORITHMS.md 2.2): ``R = U H^T`` with ``U`` the principal axes of the centred covariance of the
        weights that read the rotated channels: every reader's rows for R1 (over all layers), o_proj's column
        blocks of the query heads of each KV group for R2."""
        D, d, KV = self.geometry.hidden, self.geometry.head_dim, self.geometry.kv_heads
        rep = self.geometry.heads // KV
        C, total, count = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0
        blocks = get_module(model, self.table.blocks)
        for block in blocks:  # accumulated layer by layer: the stacked readers would be 4032 x 576 on SmolLM2
            for r in self.table.readers:
                W = get_module(block, r).weight.double()
                C += W.T @ W
                total += W.sum(0)
                count += W.shape[0]
        mean = total / count
        C = C / count - torch.outer(mean, mean)
        self.R1.copy_(principal_axes(C) @ random_hadamard(D, seed).T)
        H2 = random_hadamard(d, seed + 1)
        for i, block in enumerate(blocks):
            Wo = get_module(block, self.table.out).weight.double()  # [D, heads * d]
            cols = Wo.reshape(D, KV, rep, d).permute(1, 2, 0, 3).reshape(KV, rep * D, d)  # rows of each KV group
            cols = cols - cols.mean(dim=1, keepdim=True)
            self.R2[i].copy_(principal_axes(cols.transpose(1, 2) @ cols) @ H2.T)

    def qk_vector(self, i: int) -> torch.Tensor | None:
        """Layer ``i``'s ``u [KV, d]`` (equal on each RoPE pair), or None when no q -> k scaling is learned."""
        if self.s_qk is None:
            return None
        s = self.s_qk[i]
        return torch.cat([s, s], dim=-1) if self.table.rope_pairs == "half" else s.repeat_interleave(2, dim=-1)

    def block_weights(self, i: int, block: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer ``i``'s transformed parameters, by path in ``block`` (weights, biases, norm gains), in ``dtype``.

        ``block`` holds the untransformed weights (gains folded to 1); they are read, not changed. Differentiable
        in the learned parameters.
        """
        t, g = self.table, self.geometry
        D, KV, d, H = g.hidden, g.kv_heads, g.head_dim, g.heads
        rep = H // KV
        R1, R2 = self.R1.to(dtype), self.R2[i].to(dtype)  # [D, D], [KV, d, d]
        s_ov = self.s_ov[i].to(dtype)  # [KV, d]
        s_ud = self.s_ud[i].to(dtype)
        W = {n: get_module(block, n).weight.to(dtype) for n in t.linears}
        b = {n: get_module(block, n).bias.to(dtype) for n in t.linears if get_module(block, n).bias is not None}
        out: dict[str, torch.Tensor] = {}
        for k, (norm, readers) in enumerate(t.norms):
            s = (self.s_attn if k == 0 else self.s_mlp)[i].to(dtype)
            out[f"{norm}.{t.norm_gain}"] = s
            for r in readers:
                W[r] = (W[r] @ R1) / s  # input side: R1, then the gain's inverse on each column
        u = self.qk_vector(i)
        if u is not None:
            u = u.to(dtype)
            uq = u.repeat_interleave(rep, dim=0).reshape(-1)  # query head h reads KV head h // rep (HF repeat_kv)
            W[t.query] = W[t.query] * uq[:, None]
            W[t.key] = W[t.key] / u.reshape(-1)[:, None]
            if t.query in b:
                b[t.query] = b[t.query] * uq
            if t.key in b:
                b[t.key] = b[t.key] / u.reshape(-1)
        # v_h' = v_h R2_h diag(s_h): rows of head h <- diag(s) R2^T W_h
        W[t.value] = ((R2.transpose(-1, -2) @ W[t.value].reshape(KV, d, -1)) * s_ov[..., None]).reshape(KV * d, -1)
        if t.value in b:
            b[t.value] = ((b[t.value].reshape(KV, 1, d) @ R2).reshape(KV, d) * s_ov).reshape(-1)
        # o_proj's columns of query head h <- W_h R2_g diag(s_g)^-1, g = h // rep
        Wo = W[t.out].reshape(-1, H, d)  # [D, H, d]
        Wo = torch.einsum("ohd,hde->ohe", Wo, R2.repeat_interleave(rep, dim=0)) / s_ov.repeat_interleave(rep, dim=0)
        W[t.out] = Wo.reshape(-1, H * d)
        W[t.up] = W[t.up] / s_ud[:, None]
        if t.up in b:
            b[t.up] = b[t.up] / s_ud
        W[t.down] = W[t.down] * s_ud
        for w in t.writers:  # output side: R1^T W, and the bias as a row vector b R1
            W[w] = R1.T @ W[w]
            if w in b:
                b[w] = b[w] @ R1
        out.update({f"{n}.weight": w for n, w in W.items()})
        out.update({f"{n}.bias": v for n, v in b.items()})
        return out

    @torch.no_grad()
    def fuse(self, model: nn.Module) -> None:
        """Write the transforms into ``model`` (gains folded, lm_head untied): products in float64, rounded once."""
        t = self.table
        if is_tied(model, t):
            raise LowbitError("ost needs lm_head untied from the embedding: list fold_norms before it")
        blocks = get_module(model, t.blocks)
        for i, block in enumerate(blocks):
            gains = [getattr(get_module(block, norm), t.norm_gain) for norm, _ in t.norms]
            if any(not torch.all(gain == 1) for gain in gains):
                raise LowbitError("ost needs the norm gains folded into the readers: list fold_norms before it")
            new = self.block_weights(i, block, torch.float64)
            for name, value in new.items():
                p = block.get_parameter(name)
                p.data.copy_(value.to(p.dtype))
        R1 = self.R1.double()
        for path in (t.embed, t.lm_head):
            p = get_module(model, path).weight
            p.data.copy_((p.double() @ R1).to(p.dtype))
