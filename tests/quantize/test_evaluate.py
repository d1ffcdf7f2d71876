"""Tests of lowbit.quantize.evaluate on the real stories260K model and on dummy models whose answers are
known in advance (uniform logits; a model that has memorized one token sequence)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lowbit.calibrate.sources import TASKS, wikitext2_test_text
from lowbit.errors import LowbitError
from lowbit.quantize import evaluate
from lowbit.quantize.evaluate import _encode_pair, _prefix_tokens, _Request, _score, accuracy, perplexity

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = Path(os.environ.get("LOWBIT_DATA_DIR") or SHARED / "data")

pytestmark = pytest.mark.requires(MODEL.is_dir() and DATA.is_dir(), f"the shared model {MODEL} and data {DATA}")


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(DATA))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def wikitext() -> str:
    return wikitext2_test_text(DATA / "wikitext-2" / "test_rows.json")


class Memorized(torch.nn.Module):
    """A causal "LM" with a known answer: where the input so far equals a prefix of ``sequence`` it puts
    logit ``strength`` on the sequence's next token; everywhere else all logits are 0 (uniform over ``vocab``)."""

    def __init__(self, sequence: list[int], vocab: int, max_positions: int = 512, strength: float = 20.0) -> None:
        super().__init__()
        self.sequence = list(sequence)
        self.strength = strength
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.widths: list[int] = []  # input lengths seen, to check truncation

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        batch, width = input_ids.shape
        self.widths.append(width)
        logits = torch.zeros(batch, width, self.vocab)  # [batch, width, vocab]
        for row in range(batch):
            for pos in range(min(width, len(self.sequence) - 1)):
                if input_ids[row, pos].item() != self.sequence[pos]:
                    break
                logits[row, pos, self.sequence[pos + 1]] = self.strength
        return SimpleNamespace(logits=logits)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- perplexity -------------------------------------------------------------------------------------------

def test_perplexity_matches_a_batched_direct_computation(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, wikitext: str
) -> None:
    text = wikitext[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seqlen = 64
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    with torch.no_grad():
        logits = model(windows).logits  # all windows in one forward: [n, seqlen, vocab]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    result = perplexity(model, tokenizer, text, seqlen=seqlen, progress=False)
    assert result["windows"] == n == ids.numel() // seqlen
    assert result["seqlen"] == seqlen and result["tokens"] == n * (seqlen - 1)
    assert result["nll"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-5)

    first_two = F.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]), windows[:2, 1:].reshape(-1))
    limited = perplexity(model, tokenizer, text, seqlen=seqlen, limit=2, progress=False)
    assert limited["windows"] == 2 and limited["tokens"] == 2 * (seqlen - 1)
    assert limited["nll"] == pytest.approx(first_two.item(), rel=1e-5)
    assert perplexity(model, tokenizer, text, seqlen=seqlen, limit=10_000, progress=False)["windows"] == n


def test_stories260k_wikitext_perplexity_is_sane(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, wikitext: str
) -> None:
    result = perplexity(model, tokenizer, wikitext, seqlen=256, limit=2, progress=False)
    assert result["windows"] == 2 and result["tokens"] == 510
    # A children's-story model on Wikipedia is poor, but far better than uniform over its 512 tokens.
    assert math.isfinite(result["ppl"]) and 1.0 < result["ppl"] < 512


def test_uniform_model_perplexity_is_the_vocab_size(tokenizer: PreTrainedTokenizerBase, wikitext: str) -> None:
    result = perplexity(Memorized([], vocab=512), tokenizer, wikitext[:3000], seqlen=32, limit=3, progress=False)
    assert result["ppl"] == pytest.approx(512.0, rel=1e-6)


def test_perplexity_bad_arguments(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LowbitError, match="longer than the text"):
        perplexity(model, tokenizer, "a short text", seqlen=256, progress=False)
    with pytest.raises(LowbitError, match="max_position_embeddings"):
        perplexity(model, tokenizer, "text " * 2000, seqlen=1024, progress=False)
    with pytest.raises(LowbitError):
        perplexity(model, tokenizer, "text " * 100, seqlen=1, progress=False)
    with pytest.raises(LowbitError):
        perplexity(model, tokenizer, "text " * 100, seqlen=8, limit=0, progress=False)


# --- tokenization -----------------------------------------------------------------------------------------

def test_encode_pair_splits_like_lm_eval(tokenizer: PreTrainedTokenizerBase) -> None:
    prefix = _prefix_tokens(tokenizer)
    assert prefix == [tokenizer.bos_token_id]  # this Llama tokenizer adds a BOS by default
    context, continuation = "Question: What color is the sky?\nAnswer:", " blue"
    request = _encode_pair(tokenizer, prefix, context, continuation)
    assert request.context == tokenizer(context).input_ids
    assert request.context + request.continuation == tokenizer(context + continuation).input_ids
    # Trailing whitespace of the context moves to the continuation.
    assert _encode_pair(tokenizer, prefix, "The cat ", "sat") == _encode_pair(tokenizer, prefix, "The cat", " sat")
    with pytest.raises(LowbitError):
        _encode_pair(tokenizer, prefix, "The cat", "")


def test_score_matches_unbatched_direct_forwards(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _prefix_tokens(tokenizer)
    pairs = [("Once upon a time there was a little", " girl"), ("Tom saw a big", " dog in the park"),
             ("She said", " hello"), ("The sun was hot and the kids wanted to go to the", " beach")]
    requests = [_encode_pair(tokenizer, prefix, c, k) for c, k in pairs]
    batched = _score(model, requests, 512, 0, "t", progress=False)
    monkeypatch.setattr(evaluate, "_BATCH_SIZE", 1)
    single = _score(model, requests, 512, 0, "t", progress=False)
    for request, (ll, greedy), (ll_one, greedy_one) in zip(requests, batched, single):
        ids = torch.tensor([request.context + request.continuation])
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)  # [len, vocab]
        n = len(request.continuation)
        positions = range(len(request.context) - 1, ids.shape[1] - 1)
        direct = sum(logprobs[p, ids[0, p + 1]].item() for p in positions)
        direct_greedy = all(logprobs[p].argmax().item() == ids[0, p + 1].item() for p in positions)
        assert len(positions) == n
        assert ll == pytest.approx(direct, abs=1e-4) and ll_one == pytest.approx(direct, abs=1e-4)
        assert greedy == greedy_one == direct_greedy


# --- accuracy on dummy models -----------------------------------------------------------------------------

def test_multiple_choice_picks_the_memorized_answer(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    query = "Question: What color is the sky?"
    choices = ["green grass", "blue sky", "red apples"]
    right = _encode_pair(tokenizer, _prefix_tokens(tokenizer), query + "\nAnswer:", " " + choices[1])
    dummy = Memorized(right.context + right.continuation, vocab=len(tokenizer))
    rows = [{"query": query, "choices": choices, "gold": 1}, {"query": query, "choices": choices, "gold": 2}]
    result = accuracy(dummy, tokenizer, ["arc_easy"], data={"arc_easy": _jsonl(tmp_path / "a.jsonl", rows)},
                      progress=False)
    assert result == {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}

    # piqa queries end in "\n": the prompt must come out identical, so the same model answers it.
    piqa = [{"query": query + "\n", "choices": choices, "gold": 1}]
    result = accuracy(dummy, tokenizer, ["piqa"], data={"piqa": _jsonl(tmp_path / "p.jsonl", piqa)}, progress=False)
    assert result["piqa"]["acc"] == 1.0


def test_acc_norm_divides_by_choice_characters(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    # Uniform logits: loglik = -tokens * log(vocab), so acc picks the option with the fewest tokens and
    # acc_norm the one with the fewest tokens per character of the choice (lm-eval's len(choice): characters,
    # no delimiter space). Each row is built so that a different normalization would flip acc_norm.
    query = "Question: Which?"
    cases = [
        (["x", "the the the the"], 0, (2, 4)),  # acc right, acc_norm wrong (2/1 > 4/15)
        (["a", "dogs"], 1, (1, 3)),  # 1/1 > 3/4 but 1/2 < 3/5: dividing by len + 1 would pick "a"
        (["é é", "naïve"], 1, (4, 5)),  # 4/3 > 5/5 but 4/5 < 5/6: dividing by UTF-8 bytes would pick "é é"
    ]
    prefix = _prefix_tokens(tokenizer)
    for choices, _, tokens in cases:
        counted = [len(_encode_pair(tokenizer, prefix, query + "\nAnswer:", " " + c).continuation) for c in choices]
        assert tuple(counted) == tokens  # the premise of each row
    rows = [{"query": query, "choices": choices, "gold": gold} for choices, gold, _ in cases]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    result = accuracy(Memorized([], len(tokenizer)), tokenizer, ["arc_challenge"], data={"arc_challenge": path},
                      progress=False)
    assert result["arc_challenge"] == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}


def test_lambada_greedy_match(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    context = "Tom went to the park with his mom. He saw a big"
    right = _encode_pair(tokenizer, _prefix_tokens(tokenizer), context, " dog")
    dummy = Memorized(right.context + right.continuation, vocab=len(tokenizer))
    rows = [{"context": context, "continuation": "dog"}, {"context": context, "continuation": "cat"},
            {"context": context, "continuation": "dogs"}]  # "dogs": first tokens match, the last does not
    path = _jsonl(tmp_path / "l.jsonl", rows)
    result = accuracy(dummy, tokenizer, ["lambada_openai"], data={"lambada_openai": path}, progress=False)
    assert result["lambada_openai"] == {"acc": pytest.approx(1 / 3), "acc_norm": None, "n": 3}
    limited = accuracy(dummy, tokenizer, ["lambada_openai"], limit=1, data={"lambada_openai": path}, progress=False)
    assert limited["lambada_openai"]["n"] == 1 and limited["lambada_openai"]["acc"] == 1.0
    # Greedy match is about the argmax, not the probability: a barely preferred word (p ~ 0.005) still counts.
    weak = Memorized(right.context + right.continuation, vocab=len(tokenizer), strength=1.0)
    result = accuracy(weak, tokenizer, ["lambada_openai"], limit=1, data={"lambada_openai": path}, progress=False)
    assert result["lambada_openai"]["acc"] == 1.0


def test_winogrande_partial_evaluation(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    options = ["The trophy did not fit in the suitcase because the trophy",
               "The trophy did not fit in the suitcase because the suitcase"]
    right = _encode_pair(tokenizer, _prefix_tokens(tokenizer), options[0], " was too big.")
    dummy = Memorized(right.context + right.continuation, vocab=len(tokenizer))
    rows = [{"context_options": options, "continuation": "was too big.", "gold": 0},
            {"context_options": options[::-1], "continuation": "was too big.", "gold": 1}]
    path = _jsonl(tmp_path / "w.jsonl", rows)
    result = accuracy(dummy, tokenizer, ["winogrande"], data={"winogrande": path}, progress=False)
    assert result["winogrande"] == {"acc": 1.0, "acc_norm": None, "n": 2}


def test_long_requests_are_truncated_from_the_left(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    context, word = "word " * 60 + "end", "here"
    request = _encode_pair(tokenizer, _prefix_tokens(tokenizer), context, " " + word)
    # The model knows only the last 17 tokens: it can answer only if it is fed exactly the last 16 tokens
    # before the final target, i.e. if the request is cut from the left.
    dummy = Memorized((request.context + request.continuation)[-17:], vocab=len(tokenizer), max_positions=16)
    path = _jsonl(tmp_path / "l.jsonl", [{"context": context, "continuation": word}])
    result = accuracy(dummy, tokenizer, ["lambada_openai"], data={"lambada_openai": path}, progress=False)
    assert result["lambada_openai"]["acc"] == 1.0 and dummy.widths == [16]
    tiny = Memorized([], vocab=len(tokenizer), max_positions=len(request.continuation) - 1)
    with pytest.raises(LowbitError, match="does not fit"):
        accuracy(tiny, tokenizer, ["lambada_openai"], data={"lambada_openai": path}, progress=False)


def test_accuracy_bad_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    dummy = Memorized([], vocab=len(tokenizer))
    with pytest.raises(LowbitError, match="valid tasks"):
        accuracy(dummy, tokenizer, ["hellaswag"], progress=False)
    with pytest.raises(LowbitError):
        accuracy(dummy, tokenizer, [], progress=False)
    with pytest.raises(LowbitError):
        accuracy(dummy, tokenizer, ["piqa"], limit=0, progress=False)
    with pytest.raises(LowbitError, match="valid tasks"):
        accuracy(dummy, tokenizer, ["piqa"], data={"hellaswag": Path("x.jsonl")}, progress=False)
    with pytest.raises(LowbitError, match="no such file"):
        accuracy(dummy, tokenizer, ["piqa"], data={"piqa": Path("/nonexistent/piqa.jsonl")}, progress=False)


# --- accuracy on the real model and data ------------------------------------------------------------------

def test_stories260k_all_tasks_small(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    result = accuracy(model, tokenizer, list(TASKS), limit=6, progress=False)
    assert list(result) == list(TASKS)
    for task, scores in result.items():
        assert scores["n"] == 6
        assert 0.0 <= scores["acc"] <= 1.0 and (scores["acc"] * 6).is_integer()
        if task in ("lambada_openai", "winogrande"):
            assert scores["acc_norm"] is None
        else:
            assert 0.0 <= scores["acc_norm"] <= 1.0
