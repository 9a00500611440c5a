"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

State-dict keys follow segment-anything (``layers.N.self_attn.q_proj``, ``layers.N.norm1``..``norm4``,
``layers.N.cross_attn_token_to_image``, ``layers.N.mlp.lin1/lin2``, ``layers.N.cross_attn_image_to_token``,
``final_attn_token_to_image``, ``norm_final_attn``), so official mask-decoder weights load strictly.
Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (scale ``1/sqrt(head_dim)``, no mask,
no dropout), which matches SAM's explicit softmax attention to float rounding.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from imedsam.errors import ImedsamError
from imedsam.sam.common import MLPBlock
from imedsam.sam.dense import Linear

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the channel count by ``downsample_rate``.

    Args:
        embedding_dim: channels of the inputs and of the output.
        num_heads: number of heads; must divide ``embedding_dim // downsample_rate``.
        downsample_rate: the internal (q/k/v) dimension is ``embedding_dim // downsample_rate``.

    ``forward(q (B, Nq, C), k (B, Nk, C), v (B, Nk, C)) -> (B, Nq, C)``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        if downsample_rate <= 0 or embedding_dim % downsample_rate:
            raise ImedsamError(
                f"attention downsample_rate={downsample_rate} must be a positive divisor of "
                f"embedding_dim={embedding_dim}"
            )
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if num_heads <= 0 or self.internal_dim % num_heads:
            raise ImedsamError(
                f"num_heads={num_heads} must divide the attention's internal dimension {self.internal_dim} "
                f"(embedding_dim // downsample_rate); choose another num_heads"
            )
        self.q_proj = Linear(embedding_dim, self.internal_dim)
        self.k_proj = Linear(embedding_dim, self.internal_dim)
        self.v_proj = Linear(embedding_dim, self.internal_dim)
        self.out_proj = Linear(self.internal_dim, embedding_dim)

    def _split(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` -> ``(B, heads, N, C / heads)``."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._split(self.q_proj(q))
        k = self._split(self.k_proj(k))
        v = self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, C / heads)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """One block: token self-attention, token→image cross-attention, token MLP, image→token cross-attention.

    Each sub-layer is residual and followed by a LayerNorm (``norm1``..``norm4``). Positional encodings are
    added to queries and keys of every attention (not to values); the first block of the transformer skips
    the positional encoding (and the residual) of its self-attention, exactly as SAM.

    Args:
        embedding_dim: token channels.
        num_heads: heads of every attention.
        mlp_dim: hidden channels of the token MLP.
        activation: activation class of the MLP.
        attention_downsample_rate: internal-dimension reduction of the two cross-attentions.
        skip_first_layer_pe: True for the first block.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Args: ``queries``/``query_pe`` ``(B, Nq, C)``; ``keys`` ``(B, Nk, C)``; ``key_pe`` ``(B or 1, Nk, C)``.

        Returns the updated ``(queries, keys)`` with the same shapes.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's mask-decoder transformer: ``depth`` two-way blocks and a final token→image attention.

    Args:
        depth: number of :class:`TwoWayAttentionBlock` (2 in SAM).
        embedding_dim: channels of tokens and image embedding (256 in SAM).
        num_heads: attention heads (8 in SAM).
        mlp_dim: hidden channels of the token MLPs (2048 in SAM).
        activation: MLP activation class.
        attention_downsample_rate: internal-dimension reduction of the cross-attentions (2 in SAM).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ImedsamError(f"transformer depth={depth} must be >= 0")
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """Run the transformer.

        Args:
            image_embedding: ``(B, C, h, w)`` image tokens (embedding plus dense prompt).
            image_pe: ``(B or 1, C, h, w)`` positional encoding of the image grid (batch 1 is broadcast).
            point_embedding: ``(B, T, C)`` tokens (output tokens + sparse prompts); also their positional term.

        Returns:
            ``queries`` ``(B, T, C)``: the processed tokens; ``keys`` ``(B, h*w, C)``: the processed image
            tokens in row-major (``y`` then ``x``) order.
        """
        if image_embedding.ndim != 4 or image_embedding.shape[1] != self.embedding_dim:
            raise ImedsamError(
                f"image_embedding has shape {tuple(image_embedding.shape)}; expected (B, {self.embedding_dim}, h, w)"
            )
        if image_pe.ndim != 4 or image_pe.shape[1:] != image_embedding.shape[1:] or image_pe.shape[0] not in (
            1,
            image_embedding.shape[0],
        ):
            raise ImedsamError(
                f"image_pe has shape {tuple(image_pe.shape)}; expected (1 or B, C, h, w) matching the image "
                f"embedding {tuple(image_embedding.shape)}"
            )
        if point_embedding.ndim != 3 or point_embedding.shape[0] != image_embedding.shape[0] or (
            point_embedding.shape[2] != self.embedding_dim
        ):
            raise ImedsamError(
                f"point_embedding has shape {tuple(point_embedding.shape)}; expected "
                f"({image_embedding.shape[0]}, T, {self.embedding_dim})"
            )
        # token-major copies once: every later sum of image tokens (with their PE, with an attention output)
        # then runs on two dense (B, h*w, C) tensors instead of a transposed and a dense one (~5x slower on CPU)
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        attn = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
