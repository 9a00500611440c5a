"""Small building blocks shared by the SAM-compatible modules (key names follow segment-anything)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.sam.dense import Linear, dense_act


class MLPBlock(nn.Module):
    """Two-layer MLP ``lin2(act(lin1(x)))`` applied on the last axis; keys ``lin1``/``lin2`` as in SAM."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(dense_act(self.lin1, self.act, x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (eps 1e-6, as SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` with an additive attention bias (the encoders' relative positions).

    Shapes: ``q`` (..., N, Dk), ``k`` (..., M, Dk), ``v`` (..., M, Dv), ``bias`` broadcastable to (..., N, M);
    returns (..., N, Dv). The same function as ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
    scale=scale)``, which runs it unless autograd records on a CPU tensor: there PyTorch's fused CPU kernel does
    not take a mask and SDPA falls back to its math path, 2-4x slower in bf16 than the explicit ``baddbmm`` +
    softmax + ``bmm`` used instead (forward + backward, 2 cores: ViT-B global attention at 384² 30 -> 10 ms,
    TinyViT's 14x14 windows 40 -> 12 ms; fp32 about equal). For SDPA the bias gets q's number of dimensions
    (leading 1s): a 3-D (heads, N, M) mask sends it to its math path (5-8x slower than the fused kernel).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if not needs_grad or q.device.type != "cpu":
        bias = bias.reshape((1,) * (q.dim() - bias.dim()) + tuple(bias.shape))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    *lead, n, d = q.shape
    m = k.shape[-2]
    logits = torch.baddbmm(bias.expand(*lead, n, m).reshape(-1, n, m), q.reshape(-1, n, d),
                           k.reshape(-1, m, d).transpose(1, 2), alpha=scale)
    out = torch.bmm(logits.softmax(dim=-1), v.reshape(-1, m, v.shape[-1]))
    return out.view(*lead, n, v.shape[-1])
