"""Online transforms: Hadamard rotations applied to activations at run time, in front of the module they feed.

An online transform is a child module of the module whose activations it rotates, named as compressed-tensors
names it, ``<group>_<location>`` (``R4_input`` on a down_proj, ``R3_q_attn`` and ``R3_k_cache`` on an attention
module), so that ``state_dict()`` holds its stored matrix under the checkpoint's tensor name
``<module>.<group>_<location>.weight`` (docs/FORMAT.md). A linear with an ``*_input`` child applies it to its
input before anything else (:class:`TransformedLinear` for float linears; QuantLinear does the same before it
quantizes the activations); the attention locations are applied by the attention function of
models/attention.py.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import block_hadamard, hadamard_matrix

# compressed-tensors transform locations applied at run time, and the suffix of the child that holds each.
INPUT, Q_ATTN, K_CACHE = "input", "q_attn", "k_cache"
ONLINE_LOCATIONS = (INPUT, Q_ATTN, K_CACHE)


class OnlineHadamard(nn.Module):
    """``x [..., n] -> x @ M`` with ``M`` block-diagonal: ``n / block`` copies of ``diag(s) H_block / sqrt(block)``.

    ``H_block`` is formats/hadamard.py's Hadamard matrix of order ``block`` and ``s`` a ±1 sign vector (all ones
    for a plain Hadamard). The product runs in O(n log block) (a butterfly and one small matmul), never as a
    dense matmul, unless the stored matrix was loaded from a checkpoint and is not of that form.

    Buffers:
        weight: ``[block, block]`` float16, the unnormalised matrix ``diag(s) H_block`` (entries ±1, exact in any
            float dtype), as compressed-tensors stores a Hadamard transform (it divides by ``sqrt(block)`` when
            applying); float16 halves the checkpoint's share of a full-width R4 (1536^2 entries per layer).
    """

    def __init__(self, block: int, signs: torch.Tensor | None = None) -> None:
        super().__init__()
        self.block = block
        H = hadamard_matrix(block, torch.float64) * math.sqrt(block)
        if signs is not None:
            H = signs.to(torch.float64)[:, None] * H
        self.register_buffer("weight", H.round().to(torch.float16))
        # What forward runs, derived from ``weight``; non-persistent buffers, so they follow .to() but are not stored.
        self.register_buffer("signs", None if signs is None else signs.to(torch.float32), persistent=False)
        self.register_buffer("dense", None, persistent=False)  # set when a loaded weight is not a Hadamard of ours

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        stored = state_dict.get(prefix + "weight")
        if isinstance(stored, torch.Tensor) and stored.shape == self.weight.shape:  # keep the file's dtype
            self._buffers["weight"] = torch.empty_like(stored, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.adopt_weight()

    def adopt_weight(self) -> None:
        """Re-derive the fast path from ``weight`` (after loading): the signs if it is ``diag(s) H``, else a dense
        orthogonal matrix ``weight / sqrt(block)`` (compressed-tensors' convention for Hadamard types)."""
        W = self.weight.double()
        H = hadamard_matrix(self.block, torch.float64) * math.sqrt(self.block)
        signs = torch.sign(W[:, 0] * H[:, 0])
        if bool((signs[:, None] * H == W).all()):
            self.signs = None if bool((signs == 1).all()) else signs.float().to(self.weight.device)
            self.dense = None
        else:
            Q = W / math.sqrt(self.block)
            if not torch.allclose(Q @ Q.T, torch.eye(self.block, dtype=torch.float64), atol=1e-4):
                raise LowbitError(f"an online transform's stored matrix ({self.block} x {self.block}) is not orthogonal "
                                  "once divided by sqrt(size)")
            self.dense, self.signs = Q.float().to(self.weight.device), None

    @property
    def kind(self) -> str:
        """compressed-tensors' transform type for this matrix: "hadamard" only for an unsigned power-of-two order,
        the Sylvester matrix that compressed-tensors and vLLM build themselves (vLLM runs it with its Hadamard kernel);
        "random-hadamard" otherwise, a type whose matrix is taken from the checkpoint (compressed-tensors'
        "hadamard" refuses other orders, and its tables for them differ from formats/hadamard.py's Paley cores)."""
        sylvester = self.block & (self.block - 1) == 0 and self.signs is None and self.dense is None
        return "hadamard" if sylvester else "random-hadamard"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n]`` (n a multiple of ``block``) -> ``x @ M`` in ``x.dtype``."""
        if self.dense is not None:
            y = x.float().reshape(-1, self.block) @ self.dense.float()
            return y.reshape(x.shape).to(x.dtype)
        return block_hadamard(x, self.block, self.signs)

    def matrix(self, n: int) -> torch.Tensor:
        """The dense ``[n, n]`` float64 ``M`` with ``forward(x) == x @ M`` (for fusing its inverse into weights)."""
        blk = self.weight.double() / math.sqrt(self.block) if self.dense is None else self.dense.double()
        return torch.block_diag(*[blk] * (n // self.block))

    def extra_repr(self) -> str:
        return f"block={self.block}, kind={self.kind}"


def online_child(module: nn.Module, location: str) -> tuple[str, OnlineHadamard] | None:
    """The (name, transform) of ``module``'s child for ``location`` (``<group>_<location>``), or None."""
    for name, child in module.named_children():
        if isinstance(child, OnlineHadamard) and name.endswith("_" + location):
            return name, child
    return None


def input_transform(module: nn.Module) -> OnlineHadamard | None:
    """The online transform a linear applies to its input first, if it has one."""
    found = online_child(module, INPUT)
    return None if found is None else found[1]


class TransformedLinear(nn.Linear):
    """A float ``nn.Linear`` whose input first goes through its ``*_input`` online transform child:
    ``y = T(x) W^T + b``, with the same ``weight``/``bias`` names as the linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = input_transform(self)
        return F.linear(x if t is None else t(x), self.weight, self.bias)

    @classmethod
    def wrap(cls, linear: nn.Linear, name: str, transform: OnlineHadamard) -> "TransformedLinear":
        """A TransformedLinear sharing ``linear``'s parameters, with ``transform`` as child ``name``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.add_module(name, transform)
        return new


def hook_linear_input(linear: nn.Module, fn: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn`` with the input of ``linear``'s matmul (after its online input transform, if any), on every call.

    Calibration statistics (Hessians, absmax) must describe what the weight multiplies: in the rotated basis.
    """
    t = input_transform(linear)
    if t is not None:
        return t.register_forward_hook(lambda _m, _args, out: fn(out))
    return linear.register_forward_pre_hook(lambda _m, args: fn(args[0]))
