"""TinyViT image encoder as used by MobileSAM and LiteMedSAM (state-dict keys identical to their checkpoints).

Architecture (input (B, in_chans, S, S) -> embedding (B, out_chans, S/(4p), S/(4p)), ``p = patch_stride``)::

    patch_embed      Conv2dBN -> GELU -> Conv2dBN                 (B, C0, S/p, S/p)
    layers[0]        ConvLayer: MBConv blocks, then PatchMerging   tokens (B, (S/2p)^2, C1)
    layers[1]        BasicLayer: TinyViTBlocks, then PatchMerging  tokens (B, (S/4p)^2, C2)
    layers[2]        BasicLayer: TinyViTBlocks, then PatchMerging  tokens (B, (S/4p)^2, C3)   (stride 1)
    layers[3]        BasicLayer: TinyViTBlocks                     tokens (B, (S/4p)^2, C3)
    neck             1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d                 (B, out_chans, S/4p, S/4p)

* LiteMedSAM: ``img_size=256, patch_stride=1`` (two 1x1 convolutions), MobileSAM: ``img_size=1024,
  patch_stride=4`` (two 3x3 stride-2 convolutions). Both give a 64 x 64 embedding grid.
* The last PatchMerging (into stage 3) has stride 1, as in MobileSAM (the official code decides this from the
  output width 320/448/576; here it is always the last merge, which is the same for those widths).
* Attention in TinyViT blocks is windowed (no shift); windows are zero-padded at the bottom/right and the padded
  tokens take part in attention as keys (as the official implementation does).
* ``attention_bias_idxs`` is a non-persistent buffer: neither the LiteMedSAM nor the MobileSAM checkpoint holds
  it, so strict loading works and the indices are always rebuilt from the window size.

Adapters attach from outside (``imedsam.peft``) at the named insertion points of :mod:`imedsam.sam.insertion`:
every attention block (:class:`TinyViTBlock`, stages 1-3) has the slots ``pre_attn``, ``post_attn`` (after the
attention residual, before ``local_conv``) and ``mlp_parallel`` (beside the MLP, on the MLP's own pre-norm
``mlp.norm(x)``), tokens ``(N, H * W, C)`` with ``(H, W) = block.input_resolution``; ``attn.qkv`` is replaceable;
the encoder has ``streams``, which follow every stage's ``PatchMerging``. Stage 0 (MBConv) has no slots.

**qkv layout.** Unlike SAM's ViT (``[q | k | v]``, each over all heads), TinyViT interleaves per head: the
``qkv`` output of width ``num_heads * (2 * key_dim + d)`` is viewed as ``(num_heads, 2 * key_dim + d)`` and each
head's slice is ``[q (key_dim), k (key_dim), v (d)]``. Use :meth:`TinyViTAttention.qkv_channel_index` to get the
output channels of q, k or v (e.g. for LoRA on q and v).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.runtime import onednn_op_available
from imedsam.sam.common import LayerNorm2d, biased_attention
from imedsam.sam.dense import Linear, dense_act
from imedsam.sam.insertion import EncoderContext, add_slots, new_context

__all__ = [
    "BasicLayer",
    "Conv2dBN",
    "ConvLayer",
    "MBConv",
    "PatchEmbed",
    "PatchMerging",
    "TinyViT",
    "TinyViTAttention",
    "TinyViTBlock",
    "TinyViTMlp",
]


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate`` (training only)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


_FUSED_CONV = onednn_op_available("_convolution_pointwise")


class Conv2dBN(nn.Sequential):
    """Bias-free ``Conv2d`` (key ``c``) followed by ``BatchNorm2d`` (key ``bn``); (B, Cin, H, W) -> (B, Cout, H', W').

    When the BatchNorm uses its running statistics and nothing here trains (inference, and the frozen backbone
    while adapters train), the two run as one convolution with the BatchNorm folded into its weight and bias:
    the same function, without a pass over the (often full-resolution) output. The folded tensors are cached
    until any of the weights or statistics changes.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups,
                                       bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _foldable(self) -> bool:
        conv, bn = self.c, self.bn
        trainable = conv.weight.requires_grad or (bn.affine and (bn.weight.requires_grad or bn.bias.requires_grad))
        return not bn.training and bn.track_running_stats and not (trainable and torch.is_grad_enabled())

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of ``bn(c(x))`` in eval mode, in the conv weight's dtype (folded in fp32). Cached until a
        tensor is replaced or changed in place; weights that are inference tensors (made under
        ``torch.inference_mode``) track no version, so their fold is computed afresh on each call."""
        conv, bn = self.c, self.bn
        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if any(t.is_inference() for t in tensors):
            key = None
        else:
            key = tuple((id(t), t._version, t.dtype, t.device) for t in tensors) + (bn.eps,)
        if key is None or self._folded is None or self._folded[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable when training too
                scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
                weight = conv.weight.float() * scale[:, None, None, None]
                bias = bn.bias.float() - bn.running_mean.float() * scale
            self._folded = (key, weight.to(conv.weight.dtype), bias.to(conv.weight.dtype))
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._foldable():
            return super().forward(x)
        conv = self.c
        weight, bias = self.folded()
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def with_gelu(self, x: torch.Tensor, act: nn.GELU) -> torch.Tensor:
        """``act(self(x))``. At inference on CPU, one oneDNN convolution with the BatchNorm folded in and the GELU
        applied to its accumulator (exact erf or tanh, as ``act``): a full-resolution map is written once
        instead of three times (about 3x faster for TinyViT's first stage in bf16)."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if not (_FUSED_CONV and x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and x.requires_grad) and self._foldable()
                and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())):
            return act(self(x))
        conv = self.c
        weight, bias = self.folded()
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight.to(dtype), bias.to(dtype), list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "gelu", [], act.approximate)


class PatchEmbed(nn.Module):
    """Stem ``seq = [Conv2dBN, GELU, Conv2dBN]``: (B, in_chans, S, S) -> (B, embed_dim, S/stride, S/stride).

    ``stride=1``: two 1x1 convolutions (LiteMedSAM); ``stride=4``: two 3x3 stride-2 convolutions (MobileSAM).
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: Literal[1, 4] = 1) -> None:
        super().__init__()
        if stride not in (1, 4):
            raise ValueError(f"patch_stride must be 1 (LiteMedSAM) or 4 (MobileSAM), got {stride}")
        hidden = embed_dim // 2
        k, s, p = (1, 1, 0) if stride == 1 else (3, 2, 1)
        self.stride = stride
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, hidden, k, s, p),
            nn.GELU(),
            Conv2dBN(hidden, embed_dim, k, s, p),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from here on: oneDNN computes bf16 convolutions channels-last, and an NCHW input makes
        # it copy every output back to NCHW (54 ms per 256-channel 256^2 map on 2 cores; the LiteMedSAM encoder
        # runs about 25 % faster in bf16). Same values; the token views of later stages are channels-last anyway.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.seq[2](self.seq[0].with_gelu(x, self.seq[1]))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual, GELU. (B,C,H,W) -> same."""

    def __init__(self, dim: int, expand_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path_rate = drop_path

    def forward(self, x: torch.Tensor, ctx: EncoderContext | None = None) -> torch.Tensor:
        y = self.conv1.with_gelu(x, self.act1)
        y = self.conv2.with_gelu(y, self.act2)
        y = self.conv3(y)
        return self.act3(x + drop_path(y, self.drop_path_rate, self.training))


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1 conv, GELU, 3x3 depthwise conv (stride 2 or 1), GELU, 1x1 conv.

    Input (B, C, H, W) or tokens (B, H*W, C) with ``H, W = input_resolution``; output tokens
    (B, H'*W', out_dim) with ``H' = ceil(H / stride)``.
    """

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.conv1.with_gelu(x, self.act)
        x = self.conv2.with_gelu(x, self.act)
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class _Stage(nn.Module):
    """A stage: its ``blocks`` in order, then the optional ``downsample`` (PatchMerging)."""

    blocks: nn.ModuleList
    downsample: nn.Module | None

    def forward(self, x: torch.Tensor, ctx: EncoderContext | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class ConvLayer(_Stage):
    """Stage 0: ``blocks`` of :class:`MBConv` on (B, C, H, W), then optional ``downsample`` to tokens."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, expand_ratio: float = 4.0,
                 drop_path: Sequence[float] = (), downsample: nn.Module | None = None) -> None:
        super().__init__()
        rates = list(drop_path) or [0.0] * depth
        self.dim = dim
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio, rates[i]) for i in range(depth)])
        self.downsample = downsample



class TinyViTMlp(nn.Module):
    """Pre-norm MLP: ``fc2(GELU(fc1(norm(x))))``; keys ``norm``, ``fc1``, ``fc2``. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normed(self.norm(x))

    def forward_normed(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP after its pre-norm: ``fc2(GELU(fc1(h)))`` with ``h = norm(x)``."""
        return self.fc2(dense_act(self.fc1, self.act, h))


class TinyViTAttention(nn.Module):
    """Pre-norm multi-head attention over one window with a learned relative-position bias (LeViT style).

    Input/output: (B', N, dim) with ``N = window_size**2`` tokens of one window (B' = batch x windows).

    ``qkv`` (``nn.Linear(dim, num_heads * (2 * key_dim + d))``) is interleaved per head:
    ``[q_h (key_dim), k_h (key_dim), v_h (d)]`` for head h = 0..num_heads-1 (see the module docstring).
    ``attention_biases`` (num_heads, #distinct |dy|,|dx| offsets) is gathered through the non-persistent buffer
    ``attention_bias_idxs`` (N, N) into an additive (num_heads, N, N) bias, passed to
    :func:`~imedsam.sam.common.biased_attention` (softmax(q k^T / sqrt(key_dim) + bias) v, exactly).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float = 1.0,
                 resolution: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, num_heads * (2 * key_dim + self.d))
        self.proj = Linear(num_heads * self.d, dim)

        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs: list[int] = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), -1),
                             persistent=False)

    def qkv_channel_index(self, part: Literal["q", "k", "v"]) -> torch.Tensor:
        """Indices (LongTensor) of the ``qkv`` output channels holding ``part`` for all heads, head-major."""
        width = 2 * self.key_dim + self.d
        start, size = {"q": (0, self.key_dim), "k": (self.key_dim, self.key_dim),
                       "v": (2 * self.key_dim, self.d)}[part]
        base = torch.arange(self.num_heads)[:, None] * width
        return (base + start + torch.arange(size)[None, :]).reshape(-1)

    def attention_bias(self) -> torch.Tensor:
        """Additive bias (num_heads, N, N)."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B', heads, N, .)
        bias = self.attention_bias().to(q.dtype)
        out = biased_attention(q, k, v, bias, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.d))


class TinyViTBlock(nn.Module):
    """Window attention + depthwise ``local_conv`` + MLP, on tokens (B, H*W, dim) with fixed ``input_resolution``.

    ``x = x + attn(windows(x)); x = local_conv(x as (B, dim, H, W)); x = x + mlp(x)``, with the slots
    ``pre_attn``, ``post_attn`` and ``mlp_parallel`` of :mod:`imedsam.sam.insertion` where their names say.
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, local_conv_size: int = 3) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_size <= 0:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.drop_path_rate = drop_path
        self.attn = TinyViTAttention(dim, dim // num_heads, num_heads, attn_ratio=1.0,
                                     resolution=(window_size, window_size))
        self.mlp = TinyViTMlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        add_slots(self)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of tokens ``(B, H*W, C)`` in ``window_size`` windows (zero-padded at the bottom/right)."""
        h, w = self.input_resolution
        b, _, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = x.view(b, h, w, c)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, h * w, c)

    def forward(self, x: torch.Tensor, ctx: EncoderContext | None = None) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"TinyViTBlock expected {h}x{w}={h * w} tokens, got {n}")
        x = self.pre_attn.residual(x, ctx)
        x = x + drop_path(self.window_attention(x), self.drop_path_rate, self.training)
        x = self.post_attn.residual(x, ctx)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)
        hn = self.mlp.norm(x)
        y = drop_path(self.mlp.forward_normed(hn), self.drop_path_rate, self.training)
        return x + self.mlp_parallel.parallel(y, hn, ctx)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}")


class BasicLayer(_Stage):
    """Stages 1-3: ``blocks`` of :class:`TinyViTBlock` on tokens (B, H*W, dim), then optional ``downsample``."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] = (), local_conv_size: int = 3,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        rates = list(drop_path) or [0.0] * depth
        self.dim = dim
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList([
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, rates[i], local_conv_size)
            for i in range(depth)
        ])
        self.downsample = downsample



class TinyViT(nn.Module):
    """TinyViT encoder for SAM: (B, in_chans, img_size, img_size) -> (B, out_chans, g, g), ``g = img_size/(4p)``.

    Args:
        img_size: input side S (the input must be exactly S x S).
        in_chans: input channels.
        embed_dims: channels of the four stages.
        depths: blocks per stage (stage 0 MBConv, stages 1-3 TinyViT blocks).
        num_heads: attention heads per stage (entry 0 unused).
        window_sizes: attention window per stage (entry 0 unused).
        mlp_ratio: MLP hidden width / dim in TinyViT blocks.
        mbconv_expand_ratio: hidden width / dim in MBConv blocks.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        out_chans: channels of the neck output (SAM's prompt/mask decoder width, 256).
        patch_stride: 1 for LiteMedSAM's 1x1 stem, 4 for MobileSAM's two 3x3 stride-2 convs.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (0 = off; training only).
    """

    def __init__(self, img_size: int = 256, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 160, 320), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (2, 4, 5, 10), window_sizes: Sequence[int] = (7, 7, 14, 7),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 out_chans: int = 256, patch_stride: Literal[1, 4] = 1, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) == 4):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need 4 entries (one per stage)")
        if img_size % (4 * patch_stride):
            raise ValueError(f"img_size {img_size} must be a multiple of {4 * patch_stride}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.out_chans = out_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_stride)
        r0 = img_size // patch_stride
        # stage resolutions: r0, r0/2, r0/4, r0/4 (the last merge keeps the resolution)
        resolutions = [r0, r0 // 2, r0 // 4, r0 // 4]
        strides = [2, 2, 1]
        self.grid_size = resolutions[-1]
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear 0 -> drop_path_rate
        self.layers = nn.ModuleList()
        for i in range(4):
            res = (resolutions[i], resolutions[i])
            stage_rates = rates[sum(depths[:i]):sum(depths[:i + 1])]
            merge = (PatchMerging(res, embed_dims[i], embed_dims[i + 1], strides[i]) if i < 3 else None)
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], res, depths[0], mbconv_expand_ratio, stage_rates, merge)
            else:
                layer = BasicLayer(embed_dims[i], res, depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                   stage_rates, local_conv_size, merge)
            self.layers.append(layer)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.streams = nn.ModuleDict()  # side streams (imedsam.sam.insertion), none by default
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_tokens(self, x: torch.Tensor, *, valid_hw=None, num_slices: int = 1) -> torch.Tensor:
        """(N, in_chans, S, S) preprocessed images -> tokens after the last stage (N, g*g, C3), before the neck.

        ``valid_hw`` and ``num_slices`` reach the slots and streams through the :class:`EncoderContext`.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ImedsamError(
                f"image: TinyViT expects input (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                f"{tuple(x.shape)}; resize/pad the image to {self.img_size}x{self.img_size} first")
        ctx = new_context(x, valid_hw, num_slices)
        for stream in self.streams.values():
            stream.begin(self, x, ctx)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, ctx)
            if layer.downsample is not None:
                for stream in self.streams.values():
                    stream.follow(layer.downsample, ctx)
        return tokens

    def forward(self, x: torch.Tensor, *, valid_hw=None, num_slices: int = 1) -> torch.Tensor:
        """(N, in_chans, S, S) preprocessed images -> (N, out_chans, g, g) image embeddings."""
        x = self.forward_tokens(x, valid_hw=valid_hw, num_slices=num_slices)
        b, _, c = x.shape
        return self.neck(x.transpose(1, 2).reshape(b, c, self.grid_size, self.grid_size))
