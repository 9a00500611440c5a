"""LoRAQKV: exact no-op at init, which columns change, both layouts, scaling, the reference gate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.peft.lora import LoRAQKV


def _perturb_b(layer: LoRAQKV, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layer.targets:
            w = layer.lora_B[t].weight
            w.copy_(torch.randn(w.shape, generator=g))


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 48)


def test_noop_at_init_and_init_scheme(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4)
    x = torch.randn(2, 5, 5, 16)
    assert torch.equal(layer(x), base(x))
    for t in ("q", "v"):
        assert torch.count_nonzero(layer.lora_B[t].weight) == 0
        a = layer.lora_A[t].weight
        bound = 1.0 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
        assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert set(layer.lora_A) == {"q", "v"}


def test_parameter_names_and_freezing(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4, gate=True)
    grads = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert grads == {
        "base.weight": False, "base.bias": False,
        "lora_A.q.weight": True, "lora_A.v.weight": True,
        "lora_B.q.weight": True, "lora_B.v.weight": True,
        "lora_gate.weight": True,
    }
    assert layer.weight is base.weight and layer.bias is base.bias


def test_contiguous_only_q_and_v_columns_change(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4, alpha=8.0)
    _perturb_b(layer)
    x = torch.randn(3, 7, 16)
    diff = layer(x) - base(x)
    q, k, v = diff.split(16, dim=-1)
    assert torch.count_nonzero(k) == 0
    assert q.abs().min() > 0 and v.abs().min() > 0
    # exact formula: (alpha / rank) * B A x
    for t, d in (("q", q), ("v", v)):
        expected = 2.0 * x @ layer.lora_A[t].weight.T @ layer.lora_B[t].weight.T
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_targets_subset_k_only(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=2, targets=("k",))
    _perturb_b(layer)
    x = torch.randn(4, 16)
    q, k, v = (layer(x) - base(x)).split(16, dim=-1)
    assert torch.count_nonzero(q) == 0 and torch.count_nonzero(v) == 0 and k.abs().min() > 0


def test_interleaved_layout_matches_tinyvit_attention() -> None:
    from imedsam.sam.tiny_vit import TinyViTAttention

    torch.manual_seed(0)
    attn = TinyViTAttention(dim=12, key_dim=4, num_heads=3, attn_ratio=2.0, resolution=(2, 2))  # d = 8
    layer = LoRAQKV(attn.qkv, rank=3, num_heads=3, key_dim=4, value_dim=8)
    for t in ("q", "v"):
        assert torch.equal(layer.columns(t), attn.qkv_channel_index(t))
    x = torch.randn(5, 4, 12)
    ref = attn(x)
    attn.qkv = layer
    assert torch.equal(attn(x), ref)  # exact no-op inside the real attention
    _perturb_b(layer)
    diff = (layer(x) - layer.base(x)).view(5, 4, 3, -1)
    dq, dk, dv = diff.split([4, 4, 8], dim=-1)
    assert torch.count_nonzero(dk) == 0
    assert dq.abs().min() > 0 and dv.abs().min() > 0
    assert not torch.allclose(attn(x), ref)


def _index_add_reference(layer: LoRAQKV, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's formula, written with index_add on the target columns (no dropout here)."""
    out = layer.base(x)
    scale = layer.gate_value(x) if layer.gated else layer.scaling
    for t in layer.targets:
        out = out.index_add(-1, layer.columns(t), layer.lora_B[t](layer.lora_A[t](x)) * scale)
    return out


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("heads", [None, 3])  # contiguous [q|k|v], per-head interleaved
def test_update_as_one_gemm_equals_index_add(gate: bool, heads: int | None) -> None:
    torch.manual_seed(0)
    dims = {} if heads is None else {"num_heads": heads, "key_dim": 4, "value_dim": 8}
    layer = LoRAQKV(nn.Linear(12, 48), rank=3, gate=gate, **dims)
    _perturb_b(layer)
    x = torch.randn(5, 4, 12, requires_grad=True)
    params = [x, *layer.lora_B.parameters(), *layer.lora_A.parameters()]
    fast = layer(x)
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    slow = _index_add_reference(layer, x)
    g_slow = torch.autograd.grad(slow.square().sum(), params)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)  # one GEMM: another summation order
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    if not gate:  # and it is the dense update the merge uses
        with torch.no_grad():
            torch.testing.assert_close(fast, layer.base(x) + x @ layer.delta_weight().T)


def test_gate_reference_formula_per_window_with_padding(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4, alpha=100.0, gate=True)  # alpha ignored with a gate
    x = torch.randn(2, 3, 3, 16)
    x[1, 2:, :, :] = 0.0  # a border window with zero-padded tokens: they count in the mean
    assert torch.equal(layer(x), base(x))  # still a no-op at init
    _perturb_b(layer)
    g = (x.mean(dim=(1, 2)) @ layer.lora_gate.weight.T)[:, None, None, :]  # (2,1,1,1), padding included
    diff = layer(x) - base(x)
    q, k, v = diff.split(16, dim=-1)
    assert torch.count_nonzero(k) == 0
    for t, d in (("q", q), ("v", v)):
        expected = g * (x @ layer.lora_A[t].weight.T @ layer.lora_B[t].weight.T)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ImedsamError):
        layer.delta_weight()


def test_dropout_only_on_lora_branch(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4, dropout=0.5)
    x = torch.randn(8, 16)
    layer.train()
    assert torch.equal(layer(x), base(x))  # zero B: dropout cannot leak into the base path
    _perturb_b(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_gradients_reach_lora_not_base(base: nn.Linear) -> None:
    layer = LoRAQKV(base, rank=4)
    layer(torch.randn(3, 16)).square().sum().backward()
    assert base.weight.grad is None
    # B gets a gradient at init (A != 0); A does not yet (B == 0), as in standard LoRA
    assert layer.lora_B["q"].weight.grad.abs().sum() > 0
    assert layer.lora_A["q"].weight.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"targets": ()},
        {"targets": ("q", "x")},
        {"rank": 0},
        {"dropout": 1.0},
        {"num_heads": 3},  # interleaved layout needs all three
        {"num_heads": 5, "key_dim": 4, "value_dim": 8},  # 5 * 16 != 48
    ],
)
def test_user_errors(base: nn.Linear, kwargs: dict) -> None:
    with pytest.raises(ImedsamError):
        LoRAQKV(base, **kwargs)


def test_contiguous_needs_multiple_of_three() -> None:
    with pytest.raises(ImedsamError, match="divisible by 3"):
        LoRAQKV(nn.Linear(4, 10))
