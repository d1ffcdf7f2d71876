"""Teacher-student losses over the output head, computed a slice of tokens at a time (ALGORITHMS.md 2.3).

OSTQuant's KL-Top: with teacher probabilities ``p`` and student probabilities ``q``, both softmaxed over the FULL
vocabulary, and ``I`` the teacher's top-k indices, each position contributes ``sum_{i in I} p_i (log p_i - log q_i)``
(no renormalisation over ``I``); the loss is the mean over positions (``kl_div(..., reduction="batchmean")`` on
``[positions, k]``). "kl" is the full-vocabulary KL, "ce" the next-token cross-entropy of the student (no teacher).

The head runs on ``HEAD_CHUNK`` positions at a time and each slice's loss is backpropagated at once into the
head's input, so ``[positions, vocab]`` logits never exist whole (SmolLM2: 49152 words).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.calibrate.fisher import HEAD_CHUNK

LOSSES = ("kl-top", "kl", "ce")


def kl_top(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Summed KL-Top of logits ``student``, ``teacher`` ``[T, vocab]`` (teacher detached): a scalar."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    top_log_p, idx = log_p.topk(min(k, log_p.shape[-1]), dim=-1)  # [T, k]
    return (top_log_p.exp() * (top_log_p - log_q.gather(-1, idx))).sum()


def kl_full(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed full-vocabulary KL(p || q) of logits ``[T, vocab]``: a scalar."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def _chunk_loss(
    logits: torch.Tensor, u_teacher: torch.Tensor | None, targets: torch.Tensor | None, s: int, e: int, loss: str,
    k: int, head: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The summed loss of positions ``s:e`` given the student's logits for them ``[e - s, vocab]``."""
    if loss == "ce":
        assert targets is not None
        return F.cross_entropy(logits.float(), targets[s:e], reduction="sum")
    assert u_teacher is not None
    with torch.no_grad():
        teacher = head(u_teacher[s:e])
    return kl_top(logits, teacher, k) if loss == "kl-top" else kl_full(logits, teacher)


def head_loss_backward(
    head: Callable[[torch.Tensor], torch.Tensor], u_student: torch.Tensor, u_teacher: torch.Tensor | None,
    targets: torch.Tensor | None, loss: str, k: int, chunk: int = HEAD_CHUNK,
) -> tuple[float, torch.Tensor]:
    """The mean loss over the positions of ``u_student [T, D]`` and its gradient with respect to ``u_student``.

    Args:
        head: the output projection, ``[t, D] -> [t, vocab]`` logits (its own weights frozen).
        u_student: the student's head input (its graph is not touched: the gradient is returned, for the caller
            to backpropagate once).
        u_teacher: the teacher's head input ``[T, D]`` (no grad), for "kl-top" and "kl".
        targets: int64 ``[T]`` next tokens, for "ce".
        loss: one of :data:`LOSSES`; k: the top-k of "kl-top".

    Returns:
        (mean loss per position, float32 gradient ``[T, D]`` of that mean).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    T = u_student.shape[0]
    leaf = u_student.detach().requires_grad_(True)
    total = 0.0
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        part = _chunk_loss(head(leaf[s:e]), u_teacher, targets, s, e, loss, k, head)
        (part / T).backward()
        total += float(part.detach()) / T
    assert leaf.grad is not None
    return total, leaf.grad


@torch.no_grad()
def head_loss(
    head: Callable[[torch.Tensor], torch.Tensor], u_student: torch.Tensor, u_teacher: torch.Tensor | None,
    targets: torch.Tensor | None, loss: str, k: int, chunk: int = HEAD_CHUNK,
) -> float:
    """The mean loss of :func:`head_loss_backward`, without gradients (an evaluation)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    T = u_student.shape[0]
    total = 0.0
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        total += float(_chunk_loss(head(u_student[s:e]), u_teacher, targets, s, e, loss, k, head)) / T
    return total
