"""Calibration text -> N seeded token windows of L tokens."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from lowbit.errors import LowbitError


def calibration_windows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, n_samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Sample ``n_samples`` windows of ``seqlen`` tokens from ``texts``, reproducibly.

    The texts are joined with "\\n\\n" and tokenized once (no special tokens: a window starts anywhere in
    the stream, as in the GPTQ reference); each window starts at a uniformly random offset drawn from a
    ``torch.Generator`` seeded with ``seed``, so the same inputs always give the same windows.

    Returns:
        int64 ``[n_samples, seqlen]`` token ids.
    """
    if n_samples <= 0 or seqlen <= 1:
        raise LowbitError(f"need at least 1 sample of at least 2 tokens, got --samples {n_samples} --calib-seqlen {seqlen}")
    # The stream is longer than model_max_length on purpose (it is cut into windows): silence that warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    finally:
        hf_logging.set_verbosity(verbosity)
    if ids.numel() < seqlen:
        raise LowbitError(
            f"calibration text has {ids.numel()} tokens, shorter than one window of {seqlen}; "
            "pass a longer --calib file or a smaller --calib-seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # [N, L]
