"""The distillation losses: KL-Top's definition, chunking, and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.quantize.transforms.distill import head_loss_backward, kl_full, kl_top


def test_kl_top_is_the_partial_sum_of_the_full_kl_over_the_teacher_top_k() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 50), torch.randn(5, 50) * 2
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    terms = log_p.exp() * (log_p - log_q)  # [5, 50]
    idx = log_p.topk(7, -1).indices
    assert torch.allclose(kl_top(s, t, 7), terms.gather(-1, idx).sum(), atol=1e-6)
    assert torch.allclose(kl_top(s, t, 50), kl_full(s, t), atol=1e-5)
    assert torch.allclose(kl_full(s, t), F.kl_div(log_q, log_p, log_target=True, reduction="sum"), atol=1e-5)
    assert float(kl_top(t, t, 7)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["kl-top", "kl", "ce"])
def test_chunked_head_matches_one_call(loss: str) -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    u_s, u_t = torch.randn(23, 16, requires_grad=True), torch.randn(23, 16)
    targets = torch.randint(0, 40, (23,))
    value, grad = head_loss_backward(head, u_s, u_t, targets, loss, k=5, chunk=4)
    logits, teacher = head(u_s), head(u_t).detach()
    ref = {"kl-top": lambda: kl_top(logits, teacher, 5), "kl": lambda: kl_full(logits, teacher),
           "ce": lambda: F.cross_entropy(logits, targets, reduction="sum")}[loss]() / 23
    (g,) = torch.autograd.grad(ref, u_s)
    assert value == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(grad, g, atol=1e-6)
    assert u_s.grad is None  # the caller backpropagates once


@pytest.mark.parametrize("loss", ["kl-top", "kl", "ce"])
def test_evaluation_equals_the_training_value(loss: str) -> None:
    from lowbit.quantize.transforms.distill import head_loss

    torch.manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=False)
    u_s, u_t, targets = torch.randn(11, 8), torch.randn(11, 8), torch.randint(0, 30, (11,))
    value, _ = head_loss_backward(head, u_s, u_t, targets, loss, k=4, chunk=3)
    assert head_loss(head, u_s, u_t, targets, loss, k=4, chunk=3) == pytest.approx(value, rel=1e-6)
