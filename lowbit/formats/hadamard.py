"""Hadamard rotations: matrices of order ``K * 2^m`` and their fast ``O(n log n)`` application.

Row convention throughout: a transform applied to activations is ``x' = x @ H`` on the last dim. The
normalised matrix of order ``n = K * 2^m`` is ``H = kron(H_K, H_P) / sqrt(n)`` with ``P = 2^m``, so channel
``i = a * P + b`` (``a`` in ``[0, K)``, ``b`` in ``[0, P)``) is entry ``(a, b)`` of ``x`` viewed as ``[..., K, P]``.

Matrices are built, not read from tables:

* ``H_P`` (``P`` a power of two) by Sylvester's doubling ``H_2P = [[H_P, H_P], [H_P, -H_P]]``;
* ``H_K`` by Paley's construction I (order ``q + 1``, ``q`` prime, ``q = 3 mod 4``) or II (order ``2(q + 1)``,
  ``q`` prime, ``q = 1 mod 4``) from the quadratic residues of GF(q).

Of the decompositions ``n = K * 2^m`` the one with the largest power of two is chosen (the smallest core), so
the butterfly does most of the work and one ``K x K`` matmul the rest: 576 = 36 * 16, 1536 = 12 * 128.
Only orders 1, 2 and multiples of 4 can be Hadamard; of those, orders without such a decomposition (e.g. 172)
are reported as having no construction here.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import LowbitError

_SIZES_HINT = (
    "sizes that work are 1, 2 and K * 2^m with K = q + 1 (prime q = 3 mod 4) or K = 2(q + 1) (prime q = 1 mod 4), "
    "e.g. 12, 20, 28, 36, 44 times a power of two"
)


# ---- construction ------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    """Whether ``q`` is a prime (trial division; the orders involved are small)."""
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(k: int) -> int | None:
    """Which Paley construction builds a Hadamard core of order ``k``: 1, 2, or None for neither."""
    if k % 4 == 0 and _is_prime(k - 1) and (k - 1) % 4 == 3:
        return 1
    if k % 4 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return 2
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """The Jacobsthal matrix of GF(q), ``q`` an odd prime: int64 ``[q, q]`` with ``Q[i, j] = chi(j - i)``.

    ``chi`` is the quadratic character: 0 at 0, 1 on the nonzero squares, -1 on the non-squares.
    """
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({x * x % q for x in range(1, q)}), dtype=torch.int64)] = 1
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _bordered(q: int, corner: int, column_sign: int) -> torch.Tensor:
    """``[[corner, 1^T], [column_sign * 1, Q]]`` as int64 ``[q + 1, q + 1]``, ``Q`` the Jacobsthal matrix of GF(q)."""
    c = torch.empty((q + 1, q + 1), dtype=torch.int64)
    c[0, 0] = corner
    c[0, 1:] = 1
    c[1:, 0] = column_sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley1(q: int) -> torch.Tensor:
    """Paley I: int64 ±1 ``[q + 1, q + 1]`` Hadamard matrix, ``q`` prime with ``q = 3 mod 4``.

    ``H = I + S`` with the skew-symmetric ``S = [[0, 1^T], [-1, Q]]``.
    """
    return torch.eye(q + 1, dtype=torch.int64) + _bordered(q, 0, -1)


def _paley2(q: int) -> torch.Tensor:
    """Paley II: int64 ±1 ``[2(q + 1), 2(q + 1)]`` Hadamard matrix, ``q`` prime with ``q = 1 mod 4``.

    In the symmetric conference matrix ``C = [[0, 1^T], [1, Q]]`` each 0 becomes ``[[1, -1], [-1, -1]]`` and
    each ±1 becomes ``±[[1, 1], [1, -1]]``.
    """
    c = _bordered(q, 0, 1)
    on_zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    on_one = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, on_one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), on_zero)


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester's int64 ±1 ``[p, p]`` Hadamard matrix, ``p`` a power of two (symmetric)."""
    h = torch.ones((1, 1), dtype=torch.int64)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


@functools.lru_cache(maxsize=None)
def _core(k: int) -> torch.Tensor:
    """The cached float64 ±1 ``[k, k]`` core of order ``k`` (1 or a Paley order). Never modify it: clone first."""
    if k == 1:
        return torch.ones((1, 1), dtype=torch.float64)
    kind = _paley_kind(k)
    if kind is None:
        raise LowbitError(f"no Hadamard core of order {k}")
    built = _paley1(k - 1) if kind == 1 else _paley2(k // 2 - 1)
    return built.to(torch.float64)


@functools.lru_cache(maxsize=None)
def hadamard_core(n: int) -> tuple[int, int] | None:
    """The decomposition ``(K, 2^m)`` of ``n == K * 2^m`` used for order ``n``, or None when none is buildable.

    ``K`` is 1 for powers of two, else the smallest Paley order that works (the largest power of two).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        k = n // p
        if k == 1 or _paley_kind(k) is not None:
            return k, p
        p //= 2
    return None


def has_hadamard(n: int) -> bool:
    """Whether this module can build a Hadamard matrix of order ``n``."""
    return hadamard_core(n) is not None


def _decompose(n: int) -> tuple[int, int]:
    """``hadamard_core(n)``, raising LowbitError when there is none."""
    found = hadamard_core(n)
    if found is None:
        raise LowbitError(f"no Hadamard matrix of order {n!r} can be built: {_SIZES_HINT}")
    return found


def core_matrix(k: int) -> torch.Tensor:
    """A fresh float64 ±1 ``[k, k]`` copy of the (cached) core of order ``k``, with ``H_K @ H_K.T = k I``."""
    return _core(k).clone()


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised Hadamard matrix ``[n, n]`` in ``dtype``: ``kron(H_K, H_P) / sqrt(n)``, ``H @ H.T = I``.

    Built in float64, then cast. Raises LowbitError when no construction of order ``n`` exists here.
    """
    k, p = _decompose(n)
    h = torch.kron(_core(k), _sylvester(p).to(torch.float64)) / math.sqrt(n)
    return h.to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A float64 ``[n]`` vector of ±1 drawn from a CPU ``torch.Generator`` seeded with ``seed`` (reproducible)."""
    if n < 0:
        raise LowbitError(f"random_signs needs a length >= 0, got {n}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


# ---- fast application --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last dim: ``[rows, p]`` -> ``x @ H_p``, ``p`` a power of two.

    One butterfly stage per bit: ``log2(p)`` passes of ``O(rows * p)``, ping-ponging between two buffers (no
    allocation per stage). ``H_p`` is symmetric, so this is also ``x @ H_p.T``. Differentiable: a tensor that
    requires grad takes out-of-place stages instead.
    """
    rows, p = x.shape
    x = x.contiguous()
    if x.requires_grad and torch.is_grad_enabled():  # training through it: out= ops do not record a graph
        h = p // 2
        while h >= 1:
            y = x.view(rows, p // (2 * h), 2, h)
            x, h = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(rows, p), h // 2
        return x
    buffers: list[torch.Tensor] = []  # two new buffers, used in turn: the caller's x is never written
    h, stage = p // 2, 0
    while h >= 1:
        if len(buffers) < 2:
            buffers.append(torch.empty_like(x))
        out = buffers[stage % 2]
        y, o = x.view(rows, p // (2 * h), 2, h), out.view(rows, p // (2 * h), 2, h)
        torch.add(y[:, :, 0], y[:, :, 1], out=o[:, :, 0])
        torch.sub(y[:, :, 0], y[:, :, 1], out=o[:, :, 1])
        x, h, stage = out, h // 2, stage + 1
    return x


def _check_input(x: torch.Tensor, n: int | None, signs: torch.Tensor | None) -> int:
    """Validate ``x [..., n]`` and ``signs [n]``; returns ``n`` (the last dim of ``x`` when ``n`` is None)."""
    if not x.is_floating_point():
        raise LowbitError(f"a Hadamard transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise LowbitError("a Hadamard transform needs a tensor with at least one dimension")
    size = x.shape[-1] if n is None else n
    if x.shape[-1] != size:
        raise LowbitError(f"a Hadamard transform of order {size} needs a last dim of {size}, got {x.shape[-1]}")
    if signs is not None and tuple(signs.shape) != (size,):
        raise LowbitError(f"Hadamard signs must have shape [{size}], got {list(signs.shape)}")
    return size


def apply_hadamard(
    x: torch.Tensor, n: int | None = None, signs: torch.Tensor | None = None, transpose: bool = False
) -> torch.Tensor:
    """``x [..., n]`` times the normalised Hadamard matrix of order ``n`` along the last dim, in ``O(n log n)``.

    Args:
        x: floating ``[..., n]``; the result has the same shape and dtype. It is computed in float32 (float64
            for float64 inputs) and cast back.
        n: the order; defaults to (and must equal) ``x.shape[-1]``.
        signs: optional ±1 ``[n]`` (any float dtype): the matrix becomes ``diag(signs) @ H``.
        transpose: apply the transpose (the inverse) instead: ``x @ H.T``, or with signs ``(x @ H.T) * signs``.

    Equals ``x @ hadamard_matrix(n)`` (``x @ (diag(signs) @ H)``, ...) up to rounding: a Walsh-Hadamard
    butterfly over the ``2^m`` part, then one ``K x K`` matmul for the core.
    """
    n = _check_input(x, n, signs)
    k, p = _decompose(n)
    work = _compute_dtype(x.dtype)
    y = x.to(work).reshape(-1, n)
    if signs is not None and not transpose:
        y = y * signs.to(device=y.device, dtype=work)
    y = _walsh_hadamard(y.reshape(-1, p)).reshape(-1, k, p)
    if k > 1:
        core = _core(k).to(device=y.device, dtype=work)
        # x @ kron(H_K, H_P) on [rows, K, P] is H_K^T @ X @ H_P; the transpose uses H_K (H_P is symmetric).
        y = torch.matmul(core if transpose else core.T, y)
    y = y.reshape(-1, n) * (1.0 / math.sqrt(n))
    if signs is not None and transpose:
        y = y * signs.to(device=y.device, dtype=work)
    return y.reshape(x.shape).to(x.dtype)


def block_hadamard(
    x: torch.Tensor, block: int, signs: torch.Tensor | None = None, transpose: bool = False
) -> torch.Tensor:
    """An order-``block`` Hadamard applied to each consecutive block of ``block`` channels of ``x [..., d]``.

    The matrix is block diagonal, ``d / block`` copies of ``H_block`` (e.g. one per attention head).

    Args:
        x: floating ``[..., d]`` with ``d`` a multiple of ``block``; result has the same shape and dtype.
        block: the order of each block's Hadamard matrix.
        signs: optional ±1 ``[block]`` (shared by every block) or ``[d]`` (one sign per channel), applied as
            in :func:`apply_hadamard`: ``diag(signs) @ blockdiag(H)``.
        transpose: apply the transpose (the inverse) instead.
    """
    if x.dim() == 0 or block < 1 or x.shape[-1] % block:
        shape = list(x.shape)
        raise LowbitError(f"block Hadamard of order {block} needs a last dim that is a multiple of it, got {shape}")
    d = x.shape[-1]
    if signs is not None and tuple(signs.shape) not in ((block,), (d,)):
        raise LowbitError(f"block Hadamard signs must have shape [{block}] or [{d}], got {list(signs.shape)}")
    blocks = x.reshape(*x.shape[:-1], d // block, block)
    # Signs are ±1, so multiplying by them in x's dtype is exact: [block] or [d] both broadcast as [d / block, block].
    scale = None if signs is None else signs.reshape(-1, block).to(device=x.device, dtype=x.dtype)
    if scale is not None and not transpose:
        blocks = blocks * scale
    y = apply_hadamard(blocks, block, None, transpose)
    if scale is not None and transpose:
        y = y * scale
    return y.reshape(x.shape)


class HadamardTransform(torch.nn.Module):
    """``x [..., n] -> x @ M`` with ``M = diag(signs) @ H`` (or its transpose), ``H`` the order-``n`` Hadamard.

    Attributes:
        n: the order.
        signs: float32 ±1 buffer ``[n]``, or None for a plain Hadamard.
        transpose: whether the transpose (inverse) is applied.
    """

    signs: torch.Tensor | None

    def __init__(self, n: int, signs: torch.Tensor | None = None, transpose: bool = False) -> None:
        super().__init__()
        _decompose(n)
        if signs is not None and tuple(signs.shape) != (n,):
            raise LowbitError(f"Hadamard signs must have shape [{n}], got {list(signs.shape)}")
        self.n = n
        self.transpose = transpose
        self.register_buffer("signs", None if signs is None else signs.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``apply_hadamard(x, n, signs, transpose)`` on ``x [..., n]``; same shape and dtype."""
        return apply_hadamard(x, self.n, self.signs, self.transpose)

    def extra_repr(self) -> str:
        k, p = _decompose(self.n)
        return f"n={self.n}, core={k}x{p}, signs={self.signs is not None}, transpose={self.transpose}"

    def dense(self) -> torch.Tensor:
        """The float32 ``[n, n]`` matrix ``M`` with ``forward(x) == x @ M`` (built in float64, then cast)."""
        device = self.signs.device if self.signs is not None else None
        eye = torch.eye(self.n, dtype=torch.float64, device=device)
        return apply_hadamard(eye, self.n, self.signs, self.transpose).to(torch.float32)
