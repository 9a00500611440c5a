"""Named insertion points of ViT and TinyViT blocks: empty slots are the official block, adapters attach by name at
pre_attn / post_attn / mlp_parallel / qkv and see what the docs say, streams follow TinyViT's merges."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.peft.backbone import attention_blocks
from imedsam.sam.insertion import SLOT_NAMES, EncoderContext
from imedsam.sam.tiny_vit import TinyViT
from imedsam.sam.vit import build_image_encoder_vit


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_image_encoder_vit("vit_tiny", img_size=96).eval()


def tinyvit() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT(img_size=32, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                   window_sizes=(7, 5, 3, 3), out_chans=16).eval()


ENCODERS = {"vit": (vit, 96), "tiny_vit": (tinyvit, 32)}


class Recorder(nn.Module):
    """Slot adapter returning ``scale * tokens`` and recording what it saw."""

    def __init__(self, scale: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.seen: list[tuple[tuple[int, ...], int]] = []

    def forward(self, h: torch.Tensor, ctx: EncoderContext) -> torch.Tensor:
        self.seen.append((tuple(h.shape), ctx.num_slices if ctx is not None else 0))
        return self.scale * h


@pytest.mark.parametrize("kind", ENCODERS)
def test_empty_slots_hold_nothing_and_zero_adapters_change_nothing(kind):
    make, size = ENCODERS[kind]
    enc = make()
    ref = copy.deepcopy(enc)
    x = torch.rand(2, 3, size, size)
    blocks = attention_blocks(enc)
    assert all(len(getattr(b, s)) == 0 for b in blocks for s in SLOT_NAMES)
    assert not any(".pre_attn." in k or ".mlp_parallel." in k for k in enc.state_dict())
    for b in blocks:
        for s in SLOT_NAMES:
            getattr(b, s)["zero"] = Recorder(0.0)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), rtol=0, atol=0)
    seen = [r.seen[0] for b in blocks for r in (b.pre_attn["zero"], b.post_attn["zero"], b.mlp_parallel["zero"])]
    assert all(s[1] == 1 and s[0][0] == 2 for s in seen)  # every slot ran once, batch of 2, D = 1
    if kind == "vit":
        assert seen[0][0] == (2, 6, 6, 32)  # (N, H, W, C)
    else:
        res = blocks[0].input_resolution
        assert seen[0][0] == (2, res[0] * res[1], 16)  # (N, H*W, C)


def test_slots_add_where_their_names_say():
    """ViT block with adapters a(x) = c x: pre -> x(1+c); post after the attention residual; parallel on norm2."""
    enc = vit()
    block = enc.blocks[1]
    x = torch.randn(1, 6, 6, 32)
    with torch.no_grad():
        plain = block(x)
        block.pre_attn["a"] = Recorder(0.5)
        y = x * 1.5
        y = y + block.attention(block.norm1(y))
        torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)))
        del block.pre_attn["a"]
        block.post_attn["a"] = Recorder(1.0)
        y = x + block.attention(block.norm1(x))
        y = 2 * y
        torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)))
        del block.post_attn["a"]
        block.mlp_parallel["a"] = Recorder(1.0)
        y = x + block.attention(block.norm1(x))
        torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)) + block.norm2(y))
        del block.mlp_parallel["a"]
        torch.testing.assert_close(block(x), plain)


def test_qkv_channel_index_matches_the_fused_layout():
    enc = vit()
    attn = enc.blocks[0].attn
    dim = attn.proj.in_features
    assert torch.equal(attn.qkv_channel_index("v"), torch.arange(2 * dim, 3 * dim))
    t = tinyvit()
    tattn = t.layers[1].blocks[0].attn
    width = 2 * tattn.key_dim + tattn.d
    assert tattn.qkv_channel_index("k")[0] == tattn.key_dim and tattn.qkv_channel_index("q")[tattn.key_dim] == width


class Stream(nn.Module):
    """A stream that records the grids it follows through."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[tuple[int, ...]] = []

    def begin(self, encoder, images, ctx):
        ctx.state["s"] = encoder.patch_embed(images)
        self.grids.append(tuple(ctx.state["s"].shape))

    def follow(self, merge, ctx):
        ctx.state["s"] = merge(ctx.state["s"])
        self.grids.append(tuple(ctx.state["s"].shape))


def test_tinyvit_streams_follow_every_merge_with_the_tokens_grid():
    enc = tinyvit()
    stream = Stream()
    enc.streams["s"] = stream
    with torch.no_grad():
        enc(torch.rand(1, 3, 32, 32))
    blocks = [layer.blocks[0] for layer in enc.layers[1:]]
    # stem (NCHW), then after the merges into stages 1, 2 and 3: the tokens of those stages
    assert stream.grids[0] == (1, 8, 32, 32)
    expected = [(1, b.input_resolution[0] * b.input_resolution[1], b.dim) for b in blocks]
    assert stream.grids[1:] == expected


def test_stacks_must_be_whole():
    enc = vit()
    with pytest.raises(ImedsamError, match="num_slices"):
        enc(torch.rand(3, 3, 96, 96), num_slices=2)
    with torch.no_grad():
        assert enc(torch.rand(4, 3, 96, 96), num_slices=2).shape[0] == 4
