"""Straight-through fake quantization: the training path gives the packed path's values, and gradients."""

import torch

from lowbit.formats.int import fake_quantize, fake_quantize_activation_int, fake_quantize_ste, round_ste
from lowbit.formats.scheme import WeightScheme


def test_round_ste_values_and_identity_gradient() -> None:
    x = torch.tensor([0.5, 1.5, -2.5, 0.49, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_activation_ste_equals_packed_path_bit_for_bit() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64) * torch.rand(64) * 5
    for bits, group, sym, clip in [(4, None, False, 0.9), (8, None, True, 1.0), (4, 16, True, 0.95), (4, 32, False, 1.0)]:
        ref = fake_quantize_activation_int(x, bits, group, sym, clip)
        got = fake_quantize_activation_int(x, bits, group, sym, clip, ste=True)
        assert torch.equal(ref, got), (bits, group, sym, clip)


def test_activation_ste_gradient_reaches_the_input_and_the_scale() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 32, requires_grad=True)
    fake_quantize_activation_int(x, 4, None, False, 1.0, ste=True).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the gradient is not the plain identity: the range-setting entries get the scale's share as well
    y = x.detach().clone().requires_grad_(True)
    y.pow(2).sum().backward()
    assert not torch.allclose(x.grad, 2 * fake_quantize_activation_int(x.detach(), 4, None, False, 1.0))


def test_weight_ste_equals_fake_quantize() -> None:
    torch.manual_seed(2)
    w = torch.randn(48, 128)
    for scheme in [WeightScheme(bits=4, strategy="group", group_size=64, symmetric=True),
                   WeightScheme(bits=4, strategy="group", group_size=32, symmetric=False),
                   WeightScheme(bits=8, strategy="channel", group_size=None, symmetric=True)]:
        assert torch.equal(fake_quantize(w, scheme), fake_quantize_ste(w, scheme)), scheme
        wp = w.clone().requires_grad_(True)
        fake_quantize_ste(wp, scheme).sum().backward()
        assert wp.grad is not None and torch.isfinite(wp.grad).all()
