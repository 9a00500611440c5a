"""SAM's ViT image encoder (ViT-B/L/H) at any input size, plus the checkpoint resizing that goes with it.

Conventions
-----------
* Images enter as ``(B, in_chans, S, S)`` with ``S == img_size`` (a multiple of ``patch_size``); tokens travel
  channels-last as ``(B, h, w, C)`` with ``h = w = S / patch_size``; the neck returns ``(B, out_chans, h, w)``.
* Parameter names are those of the official segment-anything encoder (``patch_embed.proj``, ``pos_embed``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}``, ``neck.0..3``),
  so an official checkpoint loads strictly at 1024, and at any other size after :func:`adapt_vit_state_dict`.
* Adapters attach from outside (``imedsam.peft``) at the named insertion points of :mod:`imedsam.sam.insertion`:
  every :class:`Block` has the slots ``pre_attn``, ``post_attn`` and ``mlp_parallel`` (tokens ``(N, H, W, C)``),
  ``attn.qkv`` is replaceable (column layout: :meth:`Attention.qkv_channel_index`), and the encoder has
  ``streams``. ``ImageEncoderViT.forward == neck(blocks(embed(x)))``; with empty slots every block computes
  exactly the official ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``.
* Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`; with the decomposed relative
  position term (MViTv2) as an additive bias, through :func:`imedsam.sam.common.biased_attention` (SDPA, or its
  explicit form when training on CPU), which is exactly the official ``softmax(q k^T * scale + rel_bias) v``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.sam.common import LayerNorm2d, MLPBlock, biased_attention
from imedsam.sam.dense import Linear
from imedsam.sam.insertion import EncoderContext, add_slots, new_context

logger = logging.getLogger(__name__)

NormLayer = Callable[[int], nn.Module]

__all__ = [
    "VIT_CONFIGS",
    "Attention",
    "Block",
    "ImageEncoderViT",
    "PatchEmbed",
    "adapt_vit_state_dict",
    "build_image_encoder_vit",
    "decomposed_rel_pos_bias",
    "get_rel_pos",
    "resize_pos_embed",
    "resize_rel_pos",
    "window_partition",
    "window_unpartition",
]

_LN_EPS6 = partial(nn.LayerNorm, eps=1e-6)

#: Constructor keyword arguments of :class:`ImageEncoderViT` (``img_size`` excluded) for each named encoder.
#: The real ones match segment-anything's ``build_sam`` (LayerNorm eps 1e-6, window 14, rel-pos on).
#: ``vit_tiny`` is a random-init configuration for tests: 4 blocks, two of them global.
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    name: dict(
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=_LN_EPS6,
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )
    for name, embed_dim, depth, num_heads, global_attn_indexes, window_size in (
        ("vit_b", 768, 12, 12, (2, 5, 8, 11), 14),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23), 14),
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31), 14),
        ("vit_tiny", 32, 4, 2, (1, 3), 4),
    )
}


# --------------------------------------------------------------------------------------------------------------
# Windowing and relative positions (pure functions)
# --------------------------------------------------------------------------------------------------------------


def window_partition(
    x: torch.Tensor, window_size: int, fill: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut ``(B, H, W, C)`` tokens into non-overlapping ``window_size`` squares.

    The grid is padded at the bottom/right up to ``(Hp, Wp)``, the next multiples of ``window_size``, with zero
    tokens, or with copies of the token ``fill`` (``C`` values, e.g. shape ``(C,)`` or ``(1, C)``) when given.

    Returns:
        ``windows`` of shape ``(B * nWh * nWw, window_size, window_size, C)``, ordered batch-major then row-major
        over windows, and ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    hp = -(-h // window_size) * window_size
    wp = -(-w // window_size) * window_size
    if (hp, wp) != (h, w):
        if fill is None:
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        else:
            padded = fill.reshape(1, 1, 1, c).to(x.dtype).expand(b, hp, wp, c).clone()
            padded[:, :h, :w] = x
            x = padded
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws, ws, C)`` -> ``(B, H, W, C)``, padding removed."""
    hp, wp = pad_hw
    h, w = hw
    nwh, nww = hp // window_size, wp // window_size
    b = windows.shape[0] // (nwh * nww)
    x = windows.view(b, nwh, nww, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if (hp, wp) != (h, w):
        x = x[:, :h, :w, :].contiguous()
    return x


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a ``(L, C)`` relative-position table to ``(length, C)``, linearly along L (align_corners=False).

    This equals the official builders' 2-D bilinear resize of the ``(1, 1, L, C)`` tensor to ``(length, C)``
    (the C axis is left untouched). The result keeps the input dtype.
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    table = rel_pos.float().t().unsqueeze(0)  # (1, C, L)
    table = F.interpolate(table, size=length, mode="linear", align_corners=False)
    return table[0].t().to(rel_pos.dtype)


def resize_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an absolute position embedding ``(1, H, W, C)`` to ``(1, h, w, C)``.

    Bilinear, ``align_corners=False``, applied channels-first, as the SAM-Med2D / I-MedSAM builders do.
    The result keeps the input dtype.
    """
    if tuple(pos_embed.shape[1:3]) == tuple(size):
        return pos_embed
    grid = pos_embed.float().permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(pos_embed.dtype)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the relative-position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: table ``(L, C)``; it is resized linearly to ``2 * max(q_size, k_size) - 1`` if needed.

    Returns:
        ``(q_size, k_size, C)``: entry ``[i, j]`` is the embedding of the offset between query i and key j,
        where the shorter axis is stretched onto the longer one.
    """
    length = 2 * max(q_size, k_size) - 1
    table = resize_rel_pos(rel_pos, length)
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = q_coords - k_coords + (k_size - 1) * k_scale
    return table[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias of decomposed relative positions (MViTv2), as in SAM.

    Args:
        q: queries ``(..., q_h * q_w, C)`` (unscaled), any leading batch/head axes.
        rel_pos_h, rel_pos_w: tables ``(L_h, C)`` and ``(L_w, C)``.
        q_size, k_size: query and key grids ``(h, w)``.

    Returns:
        ``(..., q_h * q_w, k_h * k_w)`` bias ``q . R_h[qy, ky] + q . R_w[qx, kx]``, to be added to the logits.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)  # (q_h, k_h, C)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)  # (q_w, k_w, C)
    lead = q.shape[:-2]
    r_q = q.reshape(*lead, q_h, q_w, q.shape[-1])
    bias_h = torch.einsum("...hwc,hkc->...hwk", r_q, r_h)  # (..., q_h, q_w, k_h)
    bias_w = torch.einsum("...hwc,wkc->...hwk", r_q, r_w)  # (..., q_h, q_w, k_w)
    # bias[..., (ky, kx)] = bias_h[..., ky] + bias_w[..., kx], written as one GEMM with a 0/1 expansion matrix:
    # the same sums (each output adds exactly two non-zero terms), but a contiguous result computed far faster
    # on CPU than the 6-D broadcast add and its reshape copy.
    expand = _pair_sum_matrix(k_h, k_w, bias_h.dtype, bias_h.device)  # (k_h + k_w, k_h * k_w)
    bias = torch.cat((bias_h, bias_w), dim=-1) @ expand  # (..., q_h, q_w, k_h * k_w)
    return bias.reshape(*lead, q_h * q_w, k_h * k_w)


def _pair_sum_matrix(k_h: int, k_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0/1 matrix E (k_h + k_w, k_h * k_w) with ``[a | b] @ E = (a[:, None] + b[None, :]).flatten()``."""
    rows = torch.eye(k_h, dtype=dtype, device=device).repeat_interleave(k_w, dim=1)
    cols = torch.eye(k_w, dtype=dtype, device=device).repeat(1, k_h)
    return torch.cat((rows, cols))


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``(B, in_chans, H, W)`` -> ``(B, H/p, W/p, embed_dim)`` (key ``proj``)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` token grid, with optional decomposed relative positions.

    ``qkv`` is one ``nn.Linear(dim, 3 * dim)`` whose output is ``[q | k | v]`` (each ``dim`` wide, heads
    contiguous inside). It is called on the 4-D ``(B, H, W, C)`` input, so a module substituted for it (LoRA)
    sees the spatial layout. ``rel_pos_h``/``rel_pos_w`` are ``(2 * input_size - 1, head_dim)`` tables.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ImedsamError(f"embed_dim={dim} is not divisible by num_heads={num_heads}; pick a divisor")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ImedsamError("use_rel_pos=True needs input_size (the token grid this attention sees)")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return self.proj(self.attend(self.qkv(x)))

    def qkv_channel_index(self, part: str) -> torch.Tensor:
        """Indices (LongTensor) of the ``qkv`` output channels holding ``part`` (``"q"``, ``"k"`` or ``"v"``) for
        all heads: the contiguous block ``[i * dim, (i + 1) * dim)``, i = 0, 1, 2."""
        dim = self.proj.in_features
        i = ("q", "k", "v").index(part)
        return torch.arange(i * dim, (i + 1) * dim)

    @property
    def pointwise_qkv(self) -> bool:
        """Whether ``qkv`` maps every token on its own (a Linear, or a module that says so with ``pointwise``),
        so that it commutes with padding the token grid."""
        return isinstance(self.qkv, nn.Linear) or bool(getattr(self.qkv, "pointwise", False))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """The attention between the projections: ``qkv(x)`` ``(B, H, W, 3C)`` -> ``(B, H, W, C)`` before ``proj``."""
        b, h, w, c3 = qkv.shape
        n, c = h * w, c3 // 3
        # (B, H, W, 3C) -> (3, B, heads, N, head_dim)
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = biased_attention(q, k, v, bias, self.scale)
        return out.transpose(1, 2).reshape(b, h, w, c)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global (``0``) attention.

    ``forward(x) = y + mlp(norm2(y))`` with ``y = x + unpartition(attn(partition(norm1(x))))``; windows are
    zero-padded *after* ``norm1``. Tokens are ``(B, H, W, C)``. The slots ``pre_attn``, ``post_attn`` and
    ``mlp_parallel`` (:mod:`imedsam.sam.insertion`) add their adapters' outputs where their names say.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: NormLayer = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        add_slots(self)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of the normalised tokens ``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)``, in windows when
        ``window_size > 0``.

        As in SAM the windows are zero-padded after ``norm1``, and padding tokens take part in the attention.
        When ``qkv`` is per token (:attr:`Attention.pointwise_qkv`) the two projections run on the real tokens
        only and the padding tokens get ``qkv(0)`` directly: the same attention without projecting the padding
        (ViT-B at 384^2: 576 tokens instead of 784 in every windowed block).
        """
        if self.window_size == 0:
            return self.attn(x)
        ws, hw = self.window_size, (x.shape[1], x.shape[2])
        if (hw[0] % ws or hw[1] % ws) and self.attn.pointwise_qkv:
            qkv = self.attn.qkv(x)
            windows, pad_hw = window_partition(qkv, ws, fill=self.attn.qkv(x.new_zeros(1, x.shape[-1])))
            return self.attn.proj(window_unpartition(self.attn.attend(windows), ws, pad_hw, hw))
        windows, pad_hw = window_partition(x, ws)
        return window_unpartition(self.attn(windows), ws, pad_hw, hw)

    def forward(self, x: torch.Tensor, ctx: EncoderContext | None = None) -> torch.Tensor:
        x = self.pre_attn.residual(x, ctx)
        x = x + self.attention(self.norm1(x))
        x = self.post_attn.residual(x, ctx)
        h = self.norm2(x)
        return x + self.mlp_parallel.parallel(self.mlp(h), h, ctx)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: ``(B, in_chans, S, S)`` -> ``(B, out_chans, S/p, S/p)`` with ``S = img_size``.

    Same constructor and state-dict keys as segment-anything's ``ImageEncoderViT``. Blocks whose index is in
    ``global_attn_indexes`` attend globally (their rel-pos tables span the whole grid, ``2 * S/p - 1``); the others
    attend inside ``window_size`` windows (tables ``2 * window_size - 1``, independent of ``img_size``).
    Inputs are expected already resized and normalised to ``img_size`` (see ``imedsam`` prepare step).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: NormLayer = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if img_size <= 0 or patch_size <= 0 or img_size % patch_size:
            raise ImedsamError(
                f"img_size={img_size} must be a positive multiple of patch_size={patch_size}; e.g. 256, 512, 1024"
            )
        if window_size < 0:
            raise ImedsamError(f"window_size={window_size} must be >= 0 (0 = global attention everywhere)")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ImedsamError(f"global_attn_indexes {bad} out of range for depth={depth}; use indexes in [0, {depth})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.global_attn_indexes = tuple(int(i) for i in global_attn_indexes)
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in self.global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.streams = nn.ModuleDict()  # side streams (imedsam.sam.insertion), none by default

    @property
    def grid_size(self) -> int:
        """Tokens per side, ``img_size // patch_size``."""
        return self.img_size // self.patch_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute position embedding: ``(B, in_chans, S, S)`` -> ``(B, S/p, S/p, C)``."""
        in_chans = self.patch_embed.proj.in_channels
        if x.ndim != 4 or x.shape[1] != in_chans:
            raise ImedsamError(f"encoder input has shape {tuple(x.shape)}; expected (B, {in_chans}, H, W)")
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ImedsamError(
                f"encoder input is {x.shape[-2]}x{x.shape[-1]} but the encoder was built for img_size={self.img_size}; "
                f"resize the image to {self.img_size}x{self.img_size} or build the encoder with that img_size"
            )
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_tokens(self, x: torch.Tensor, *, valid_hw: Any = None, num_slices: int = 1) -> torch.Tensor:
        """``(N, in_chans, S, S)`` -> tokens after the last block ``(N, S/p, S/p, C)``, before the neck.

        ``valid_hw`` and ``num_slices`` reach the slots and streams through the :class:`EncoderContext`.
        """
        tokens = self.embed(x)  # validates the input first
        ctx = new_context(x, valid_hw, num_slices)
        for stream in self.streams.values():
            stream.begin(self, x, ctx)
        for block in self.blocks:
            tokens = block(tokens, ctx)
        return tokens

    def forward(self, x: torch.Tensor, *, valid_hw: Any = None, num_slices: int = 1) -> torch.Tensor:
        """``(N, in_chans, S, S)`` -> image embedding ``(N, out_chans, S/p, S/p)`` (see :meth:`forward_tokens`)."""
        return self.neck(self.forward_tokens(x, valid_hw=valid_hw, num_slices=num_slices).permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and builders
# --------------------------------------------------------------------------------------------------------------


def adapt_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], encoder: ImageEncoderViT, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Resize a ViT checkpoint's size-dependent tensors to ``encoder``'s input size.

    * ``{prefix}pos_embed`` ``(1, H, W, C)`` -> the encoder's grid: bilinear, ``align_corners=False``,
      channels-first (as the SAM-Med2D / I-MedSAM builders).
    * ``{prefix}blocks.{i}.attn.rel_pos_{h,w}`` for ``i`` in ``encoder.global_attn_indexes`` only:
      ``(2G - 1, head_dim)`` -> ``(2g - 1, head_dim)``, linear along the length axis.
    * Windowed blocks' tables are left as they are: their length depends on the window size only. If it
      differs from the encoder's, an :class:`ImedsamError` is raised (the checkpoint has another window size).

    Args:
        state_dict: the checkpoint (e.g. a full SAM state dict, then ``prefix="image_encoder."``).
        encoder: the model that will load it; target shapes are read from its own parameters.
        prefix: key prefix of the encoder inside ``state_dict``.

    Returns:
        A new dict (the input is not modified) with every key kept and the tensors above resized, dtypes kept.
    """
    out = dict(state_dict)
    own = encoder.state_dict()

    key = f"{prefix}pos_embed"
    if key in out and "pos_embed" in own:
        src, dst = out[key], own["pos_embed"]
        if src.ndim != 4 or src.shape[-1] != dst.shape[-1]:
            raise ImedsamError(
                f"checkpoint {key} has shape {tuple(src.shape)} but the encoder expects (1, h, w, {dst.shape[-1]}); "
                "the checkpoint is for another ViT variant: pick the matching model name"
            )
        if src.shape != dst.shape:
            logger.info("resizing %s %s -> %s", key, tuple(src.shape), tuple(dst.shape))
            out[key] = resize_pos_embed(src, (dst.shape[1], dst.shape[2]))

    for i, block in enumerate(encoder.blocks):
        if not block.attn.use_rel_pos:
            continue
        for axis in ("h", "w"):
            name = f"blocks.{i}.attn.rel_pos_{axis}"
            key = prefix + name
            if key not in out:
                continue
            src, dst = out[key], own[name]
            if src.ndim != 2 or src.shape[1] != dst.shape[1]:
                raise ImedsamError(
                    f"checkpoint {key} has shape {tuple(src.shape)} but the encoder expects (L, {dst.shape[1]}); "
                    "the checkpoint is for another ViT variant: pick the matching model name"
                )
            if src.shape == dst.shape:
                continue
            if i in encoder.global_attn_indexes:
                logger.info("resizing %s %s -> %s", key, tuple(src.shape), tuple(dst.shape))
                out[key] = resize_rel_pos(src, dst.shape[0])
            else:
                raise ImedsamError(
                    f"checkpoint {key} has length {src.shape[0]} but windowed block {i} expects {dst.shape[0]} "
                    f"(window_size={block.window_size}); build the encoder with the checkpoint's window size"
                )
    return out


def build_image_encoder_vit(name: str, img_size: int = 1024, **overrides: Any) -> ImageEncoderViT:
    """Build a randomly initialised encoder from :data:`VIT_CONFIGS` (``vit_b``, ``vit_l``, ``vit_h``, ``vit_tiny``).

    ``overrides`` replace entries of the named configuration (e.g. ``in_chans=1``).
    """
    if name not in VIT_CONFIGS:
        raise ImedsamError(f"unknown ViT encoder {name!r}; choose one of {sorted(VIT_CONFIGS)}")
    return ImageEncoderViT(img_size=img_size, **{**VIT_CONFIGS[name], **overrides})
