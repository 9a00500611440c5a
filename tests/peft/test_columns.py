"""imedsam.peft.columns: low-rank updates of fused-qkv columns as one GEMM, against index_add_."""

import pytest
import torch

from imedsam.peft.columns import add_low_rank
from imedsam.peft.fact import FacTFactors, FacTQKV
from imedsam.sam.tiny_vit import TinyViTAttention
from imedsam.sam.vit import Attention as ViTAttention


def _interleaved(heads, kd, vd, part):
    per = 2 * kd + vd
    start = {"q": 0, "k": kd, "v": 2 * kd}[part]
    width = kd if part in "qk" else vd
    return torch.tensor([h * per + start + j for h in range(heads) for j in range(width)])


@pytest.mark.parametrize("sets, n_out", [
    ([torch.arange(8, 16)], 24),                                        # ViT [q|k|v]: k
    ([torch.arange(0, 8), torch.arange(16, 24)], 24),                   # ViT: q and v
    ([_interleaved(4, 3, 5, "q"), _interleaved(4, 3, 5, "v")], 44),     # TinyViT per head
    ([torch.tensor([0, 2, 3]), torch.tensor([3, 5, 1])], 6),            # any columns, overlapping
])
def test_add_low_rank_equals_index_add_values_and_gradients(sets, n_out):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, requires_grad=True)
    w = torch.randn(n_out, 7)
    hs = [torch.randn(2, 5, 3, requires_grad=True) for _ in sets]
    ups = [torch.randn(c.numel(), 3, requires_grad=True) for c in sets]
    g = torch.randn(2, 5, n_out)

    def run(fn):
        out = fn(torch.nn.functional.linear(x, w))
        return (out.detach(), *torch.autograd.grad((out * g).sum(), (x, *hs, *ups)))

    def by_index_add(out):
        for h, u, c in zip(hs, ups, sets):
            out = out.index_add(-1, c, h @ u.t())
        return out

    for a, b in zip(run(by_index_add), run(lambda out: add_low_rank(out, hs, ups, sets))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_add_low_rank_follows_the_outputs_dtype():
    out = torch.zeros(4, 6, dtype=torch.bfloat16)
    add_low_rank(out, [torch.ones(4, 2)], [torch.ones(3, 2)], [torch.tensor([0, 1, 5])])
    assert out.dtype == torch.bfloat16
    assert out[:, [0, 1, 5]].eq(2).all() and out[:, 2:5].eq(0).all()


@pytest.mark.parametrize("attn", [ViTAttention(24, num_heads=2),
                                  TinyViTAttention(40, key_dim=8, num_heads=5, resolution=(2, 2))])
def test_fact_update_lands_on_the_attentions_own_columns(attn):
    """FacT through the one GEMM: what index_add_ on the attention's q/v columns gives, values and grads."""
    torch.manual_seed(1)
    dim = attn.qkv.in_features
    factors = FacTFactors([dim], rank=3)
    torch.nn.init.normal_(factors.pair(dim).v.weight)
    columns = {t: attn.qkv_channel_index(t) for t in ("q", "v")}
    fact = FacTQKV(attn.qkv, factors.pair(dim), columns, dropout=0.0, scale=0.5)
    x = torch.randn(3, 4, dim)
    g = torch.randn(3, 4, attn.qkv.out_features)
    out = fact(x)
    grads = torch.autograd.grad((out * g).sum(), list(factors.parameters()) + list(fact.cores.parameters()))
    pair = factors.pair(dim)
    ref = attn.qkv(x)
    for t in columns:
        ref = ref.index_add(-1, columns[t], pair.v(fact.cores[t](pair.u(x))) * 0.5)
    ref_grads = torch.autograd.grad((ref * g).sum(), list(factors.parameters()) + list(fact.cores.parameters()))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
