"""The encoders' biased attention: its explicit training form on CPU is SDPA's function, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from imedsam.sam.common import biased_attention


def _sdpa(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@pytest.mark.parametrize("shape, bias_shape, bias_grad", [
    ((2, 3, 49, 8), (3, 49, 49), False),    # TinyViT: one (heads, N, N) table shared by every window
    ((1, 4, 36, 16), (1, 4, 36, 36), True),  # ViT: relative positions computed from q (the bias has a gradient)
])
def test_training_form_matches_sdpa_values_and_gradients(shape, bias_shape, bias_grad):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64, requires_grad=bias_grad)
    scale = shape[-1] ** -0.5
    ours = biased_attention(q, k, v, bias, scale)
    ref = _sdpa(q, k, v, bias, scale)
    torch.testing.assert_close(ours, ref)
    inputs = (q, k, v, bias) if bias_grad else (q, k, v)
    g_ours = torch.autograd.grad(ours.square().sum(), inputs)
    g_ref = torch.autograd.grad(ref.square().sum(), inputs)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_training_form_is_taken_only_when_autograd_records(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    bias = torch.randn(2, 9, 9)
    biased_attention(q, q, q, bias, 0.5)
    assert calls == []  # training: the explicit form
    with torch.no_grad():
        biased_attention(q, q, q, bias, 0.5)
    biased_attention(q.detach(), q.detach(), q.detach(), bias, 0.5)
    assert len(calls) == 2  # inference: SDPA's fused kernel


def test_bf16_autocast_training_form_stays_close_to_fp32():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 3, 49, 16, generator=gen, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 49, 49, generator=gen)
    ref = biased_attention(q, k, v, bias, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = biased_attention(q, k, v, bias, 0.25)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)
    low.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
