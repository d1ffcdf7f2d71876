"""Quality checks: WikiText-2 perplexity and zero-shot accuracy scored the way lm-evaluation-harness does.

Both functions take any causal LM that behaves like a transformers model - ``model(input_ids=...)`` returns an
object with ``.logits`` of shape [batch, seq, vocab] - float or quantized, on whatever ``model.device`` is.
Log-probabilities are always computed in float32, whatever dtype the model produces its logits in, so that a
bf16 model and its fp32 twin are compared on the same arithmetic.

Tokenization keeps the tokenizer's default special tokens at the front of a text (a BOS for Llama-style
tokenizers, nothing for GPT-2-style ones such as SmolLM2's). Perplexity therefore scores the WikiText-2 text as
one stream that may start with a BOS; zero-shot requests start with the same prefix. Note that
lm-evaluation-harness itself adds no BOS unless asked (``add_bos_token=True``), so Llama-tokenizer numbers can
differ slightly from its defaults; models whose tokenizer adds nothing match it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.calibrate.sources import TASKS, task_rows
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Zero-shot requests are batched up to this many sequences and this many padded tokens: enough to keep two
# CPU cores busy, small enough that the [batch, seq, vocab] logits of a 49k-vocab model stay under ~1 GB.
_BATCH_SIZE = 16
_BATCH_TOKENS = 4096
# lm-evaluation-harness's fallback when neither the config nor the tokenizer states a context length.
_DEFAULT_MAX_LENGTH = 2048


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int = 2048,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``text`` over non-overlapping windows of ``seqlen`` tokens (the GPTQ/QuaRot protocol).

    The text is tokenized once with the tokenizer's defaults (so a Llama tokenizer puts one BOS at the very
    start of the stream, not at every window), cut into ``len(ids) // seqlen`` windows of shape [1, seqlen]
    (the ragged tail is dropped), and each window is scored independently: tokens 1..seqlen-1 given the ones
    before them. The first token of each window is context only.

    Args:
        model: causal LM; its output ``.logits`` is [1, seqlen, vocab] in any float dtype.
        tokenizer: the model's tokenizer.
        text: the whole evaluation text (e.g. :func:`lowbit.calibrate.sources.wikitext2_test_text`).
        seqlen: window length in tokens, at most the model's ``max_position_embeddings``.
        limit: score only the first ``limit`` windows (all when None).
        progress: show a tqdm bar over windows.

    Returns:
        ``{"ppl": exp(nll), "seqlen": seqlen, "windows": n, "tokens": n * (seqlen - 1), "nll": mean token NLL}``.
    """
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise LowbitError(f"limit must be a positive number of windows, got {limit}")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seqlen > max_positions:
        # Past its trained context a RoPE model still runs but its perplexity is meaningless.
        raise LowbitError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_positions}; "
                          f"pass --seqlen {max_positions} or less")
    # verbose=False: the whole text is far longer than model_max_length on purpose; skip that warning.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # [n_tokens] int64
    available = ids.numel() // seqlen
    if available == 0:
        raise LowbitError(f"seqlen {seqlen} is longer than the text ({ids.numel()} tokens)")
    windows = available if limit is None else min(limit, available)
    batches = ids[: windows * seqlen].view(windows, seqlen)  # [windows, seqlen]

    model.eval()
    device = model.device
    nll_sum = 0.0  # accumulated in a Python float (float64): 300k token NLLs lose digits in float32
    with torch.inference_mode():
        for window in tqdm(batches, desc=f"ppl@{seqlen}", disable=not progress, unit="win"):
            window = window.to(device)[None]  # [1, seqlen]
            logits = model(input_ids=window, use_cache=False).logits[0, :-1]  # [seqlen-1, vocab]
            # Standard shift: position t predicts token t+1. cross_entropy = log_softmax + NLL, in float32.
            nll_sum += F.cross_entropy(logits.float(), window[0, 1:], reduction="sum").item()
            del logits  # a 2048 x 49152 float32 copy is 400 MB; free it before the next forward
    tokens = windows * (seqlen - 1)
    nll = nll_sum / tokens
    return {"ppl": math.exp(nll), "seqlen": seqlen, "windows": windows, "tokens": tokens, "nll": nll}


@dataclass(frozen=True)
class _Request:
    """One (context, continuation) pair to score; token ids, context first, already prefix-tokened."""

    context: list[int]
    continuation: list[int]


def _prefix_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before any text by default ([bos] for Llama, [] for GPT-2).

    Found by diffing a probe with and without special tokens; trailing specials (an EOS some tokenizers
    append) are deliberately not kept, since they would land inside the scored continuation.
    """
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, prefix: list[int], context: str, continuation: str
) -> _Request:
    """Tokenize a request the way lm-evaluation-harness's ``_encode_pair`` does.

    Trailing whitespace moves from the context to the continuation, then ``context + continuation`` is
    encoded whole and the continuation's tokens are what follows the context's own encoding. Encoding the
    whole string keeps the token boundary the model would really see at the seam.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = list(whole[len(context_ids):])
    context_ids = prefix + list(context_ids)
    if not context_ids:
        # Nothing to condition on: like lm-eval, start from the end-of-text token.
        eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if eot is None:
            raise LowbitError("empty context and the tokenizer has no EOS/BOS token to start from")
        context_ids = [eot]
    if not continuation_ids:
        raise LowbitError(f"continuation {continuation!r} encodes to no tokens")
    return _Request(context_ids, continuation_ids)


def _max_length(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest input the model takes, looked up in lm-evaluation-harness's order."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return _DEFAULT_MAX_LENGTH


def _score(
    model: torch.nn.Module, requests: list[_Request], max_length: int, pad_id: int, desc: str, progress: bool
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation and whether greedy decoding reproduces it exactly.

    Inputs are ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation; the last token is
    only ever a target), right-padded into [batch, seq] int64 batches. No attention mask is passed: with
    right padding every pad token sits after all real tokens, so causal attention never lets a real position
    see one, and the model keeps its unmasked fast path. Longest requests go first so padding stays small.
    """
    inputs = [(r.context + r.continuation)[-(max_length + 1):][:-1] for r in requests]
    for request, seq in zip(requests, inputs):
        if len(request.continuation) > len(seq):
            raise LowbitError(f"a {desc} continuation of {len(request.continuation)} tokens does not fit "
                              f"the model's {max_length}-token context")
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = model.device
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(inputs[order[start]])  # the longest of the batch, since order is by length
            size = max(1, min(_BATCH_SIZE, _BATCH_TOKENS // width))
            batch = order[start:start + size]
            tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, width]
            for row, index in enumerate(batch):
                tokens[row, : len(inputs[index])] = torch.tensor(inputs[index], dtype=torch.long)
            logits = model(input_ids=tokens.to(device), use_cache=False).logits  # [batch, width, vocab]
            for row, index in enumerate(batch):
                target = torch.tensor(requests[index].continuation, device=logits.device)  # [n]
                end = len(inputs[index])
                # Position t predicts token t+1, so the n continuation tokens are predicted at [end-n, end).
                logprobs = logits[row, end - target.numel(): end].float().log_softmax(-1)  # [n, vocab]
                loglik = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[index] = (loglik, greedy)
            del logits
            bar.update(len(batch))
            start += len(batch)
    bar.close()
    return results


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def _task_requests(
    task: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase, prefix: list[int]
) -> tuple[list[list[_Request]], list[list[int]]]:
    """Requests per row, and per row the option lengths lm-eval's acc_norm divides by.

    Prompts are lm-evaluation-harness's: LAMBADA scores " " + last word after the passage; PIQA/ARC score
    " " + choice after "Question: ...\\nAnswer:"; WinoGrande scores the shared " " + continuation after each
    option-filled sentence prefix ("partial evaluation").
    """
    per_row: list[list[_Request]] = []
    lengths: list[list[int]] = []
    for row in rows:
        if task == "lambada_openai":
            pairs = [(row["context"], " " + row["continuation"])]
            lengths.append([len(row["continuation"])])
        elif task == "winogrande":
            pairs = [(option, " " + row["continuation"]) for option in row["context_options"]]
            lengths.append([len(row["continuation"])] * len(pairs))
        else:
            # piqa's query already ends in "\n" (lm-eval's "Question: {goal}\nAnswer:"); arc's does not.
            query = row["query"]
            context = query + ("Answer:" if query.endswith("\n") else "\nAnswer:")
            pairs = [(context, " " + choice) for choice in row["choices"]]
            # lm-eval normalizes by len(choice): characters, without the " " delimiter.
            lengths.append([max(1, len(choice)) for choice in row["choices"]])
        per_row.append([_encode_pair(tokenizer, prefix, context, cont) for context, cont in pairs])
    return per_row, lengths


def accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: int | None = None,
    data: dict[str, Path] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Zero-shot accuracy on lambada_openai, piqa, winogrande, arc_easy and arc_challenge.

    Args:
        model: causal LM; ``.logits`` [batch, seq, vocab] in any float dtype.
        tokenizer: the model's tokenizer.
        tasks: task names (see :data:`lowbit.calibrate.sources.TASKS`).
        limit: score only the first ``limit`` rows of each task.
        data: per-task ``.jsonl`` paths overriding the defaults of :func:`~lowbit.calibrate.sources.task_rows`.
        progress: one tqdm bar per task.

    Returns:
        ``{task: {"acc": float, "acc_norm": float | None, "n": rows scored}}``. ``acc`` is greedy exact match
        for LAMBADA and argmax of summed continuation log-likelihood otherwise; ``acc_norm`` divides the
        log-likelihood by the option's character length (PIQA/ARC) and is None where lm-eval does not report
        it (LAMBADA, WinoGrande).
    """
    if not tasks:
        raise LowbitError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise LowbitError(f"limit must be a positive number of rows, got {limit}")
    data = data or {}
    for name in list(tasks) + list(data):
        if name not in TASKS:
            raise LowbitError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    # Read every task before scoring any, so a missing file fails in seconds, not after an hour.
    rows = {task: task_rows(task, data.get(task))[:limit] for task in dict.fromkeys(tasks)}

    model.eval()
    prefix = _prefix_tokens(tokenizer)
    max_length = _max_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # never attended to
    results: dict[str, dict] = {}
    for task, task_data in rows.items():
        per_row, lengths = _task_requests(task, task_data, tokenizer, prefix)
        flat = [request for requests in per_row for request in requests]
        scores = iter(_score(model, flat, max_length, pad_id, task, progress))
        hits = hits_norm = 0
        for row, requests, chars in zip(task_data, per_row, lengths):
            logliks, greedy = zip(*(next(scores) for _ in requests))
            if task == "lambada_openai":
                hits += greedy[0]
                continue
            hits += _argmax(list(logliks)) == row["gold"]
            hits_norm += _argmax([ll / n for ll, n in zip(logliks, chars)]) == row["gold"]
        n = len(task_data)
        has_norm = task not in ("lambada_openai", "winogrande")
        results[task] = {"acc": hits / n, "acc_norm": hits_norm / n if has_norm else None, "n": n}
    return results
