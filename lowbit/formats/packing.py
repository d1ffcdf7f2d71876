"""Dense bit packing of b-bit codes into int32 words (the compressed-tensors "pack-quantized" layout).

Bit order: along the packed dimension, element ``i`` occupies global bits ``[i*b, (i+1)*b)`` of the row,
where global bit ``k`` is bit ``k % 32`` (LSB = 0) of word ``k // 32``. Codes are stored unsigned, as
``q + 2^(b-1)`` for a signed code ``q``. For b in {1, 2, 4, 8} no element straddles a word (word ``j``
holds elements ``j*32/b ... (j+1)*32/b - 1``, the first in the lowest bits); for b = 3, 5, 6, 7 an element
may straddle two words (low part in the high bits of word ``k``, high part in the low bits of word
``k+1``). A row of ``n`` codes takes ``ceil(n*b/32)`` words; unused high bits of the last word are 0.
"""

from __future__ import annotations

import math

import torch


def _bit_positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32  # word index, bit offset inside the word


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed int8 codes ``[rows, n]`` (or ``[n, cols]`` with dim=0) into int32 words along ``dim``.

    Returns int32 ``[rows, ceil(n*bits/32)]`` (or ``[ceil(n*bits/32), cols]`` for dim=0).
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_codes expects int8 codes, got {codes.dtype}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if dim == 0:
        return pack_codes(codes.t(), bits, 1).t().contiguous()
    rows, n = codes.shape
    u = codes.to(torch.int64) + (1 << (bits - 1))  # unsigned in [0, 2^b)
    if int(u.min()) < 0 or int(u.max()) >= (1 << bits):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    n_words = math.ceil(n * bits / 32)
    word, offset = _bit_positions(n, bits, codes.device)
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)  # +1: straddle spill
    # Fields never overlap, so adding is OR; int64 holds the up-to-39-bit shifted values.
    acc.index_add_(1, word, u << offset)
    acc[:, 1:] += acc[:, :-1] >> 32  # carry the spilled high part of straddling fields into the next word
    low = acc[:, :n_words] & 0xFFFFFFFF
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)  # reinterpret as int32


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words -> signed int8 codes with ``n`` elements along ``dim``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_codes expects int32 words, got {packed.dtype}")
    if dim == 0:
        return unpack_codes(packed.t(), bits, n, 1).t().contiguous()
    rows, n_words = packed.shape
    if n_words != math.ceil(n * bits / 32):
        raise ValueError(f"{n_words} words cannot hold exactly {n} codes of {bits} bits")
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], dim=1)
    word, offset = _bit_positions(n, bits, packed.device)
    # 64-bit window of (next word, this word) so a straddling field is one shift and mask.
    window = words[:, word] | (words[:, word + 1] << 32)  # [rows, n]
    u = (window >> offset) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)
