"""Bit packing: golden words, the documented bit order, and round trips for every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.packing import pack_codes, unpack_codes


def test_int4_golden_word() -> None:
    # unsigned nibbles 0..7 (signed -8..-1), element 0 in the lowest nibble
    codes = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1]], dtype=torch.int8)
    assert pack_codes(codes, 4).tolist() == [[0x76543210]]


def test_int4_high_nibble_sets_sign_bit() -> None:
    codes = torch.tensor([[7, 7, 7, 7, 7, 7, 7, 7]], dtype=torch.int8)  # unsigned 15 everywhere
    assert pack_codes(codes, 4).tolist() == [[-1]]  # 0xFFFFFFFF as int32


def test_int3_straddles_words() -> None:
    # 11 codes of 3 bits: element 10 takes bits 30-32, i.e. 2 bits of word 0 and 1 bit of word 1.
    codes = torch.full((1, 11), -4, dtype=torch.int8)
    codes[0, 10] = 3  # unsigned 7 = 0b111
    words = pack_codes(codes, 3)
    assert words.shape == (1, 2)
    assert words[0, 0].item() == (0b11 << 30) - (1 << 32)  # top two bits set, as int32
    assert words[0, 1].item() == 0b1


def test_int8_is_bytes() -> None:
    codes = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    word = pack_codes(codes, 8)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (8 * i)) & 0xFF for i in range(4)] == [0, 127, 128, 255]


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 130), dim=st.sampled_from([0, 1]), seed=st.integers(0, 999))
def test_round_trip(bits: int, rows: int, n: int, dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    codes = torch.randint(lo, hi, (rows, n), generator=gen, dtype=torch.int8)
    if dim == 0:
        codes = codes.t().contiguous()
    packed = pack_codes(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == -(-n * bits // 32)
    assert torch.equal(unpack_codes(packed, bits, n, dim=dim), codes)


def test_out_of_range_codes_are_rejected() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 8)
