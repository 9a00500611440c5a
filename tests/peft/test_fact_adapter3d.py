"""MA-SAM's adapters: FacT (shared U/V, per-block cores, V zero: an exact no-op at init, q and v columns only) and
the 3-D adapter (zero-init no-op; slice mixing reaches the kernel's neighbours and nothing beyond)."""

from __future__ import annotations

import copy

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.peft.adapter3d import Adapter3D, attach_adapter3d
from imedsam.peft.backbone import attention_blocks, freeze_backbone
from imedsam.peft.fact import FacTFactors, FacTQKV, attach_fact
from imedsam.sam.insertion import EncoderContext
from imedsam.sam.tiny_vit import TinyViT
from imedsam.sam.vit import build_image_encoder_vit


def vit():
    torch.manual_seed(0)
    return build_image_encoder_vit("vit_tiny", img_size=64).eval()


def tinyvit():
    torch.manual_seed(0)
    return TinyViT(img_size=32, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                   window_sizes=(7, 5, 3, 3), out_chans=16).eval()


@pytest.mark.parametrize("make", [vit, tinyvit])
def test_fact_is_a_no_op_at_init_then_touches_q_and_v_only(make):
    enc = make()
    ref = copy.deepcopy(enc)
    freeze_backbone(enc)
    widths = sorted({b.attn.qkv.in_features for b in attention_blocks(enc)})
    factors = FacTFactors(widths, rank=4)
    attach_fact(enc, factors, dropout=0.0)
    x = torch.rand(2, 3, enc.img_size, enc.img_size)
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x))
        for pair in factors.factors.values():
            pair.v.weight.normal_()
        qkv = next(m for m in enc.modules() if isinstance(m, FacTQKV))
        t = torch.randn(3, qkv.in_features)
        changed = (qkv(t) - qkv.base(t)).abs().amax(0) > 0
    expected = torch.zeros_like(changed)
    for part in ("q", "v"):
        expected[getattr(qkv, f"_cols_{part}")] = True
    assert torch.equal(changed, expected)
    # shared factors are saved once (by their owner), cores per block and projection
    keys = list(enc.state_dict())
    assert not any(".u." in k or "_factors" in k for k in keys)
    assert sum(".attn.qkv.cores." in k for k in keys) == 2 * len(attention_blocks(enc))
    assert len(factors.factors) == len(widths)


def test_fact_gradients_reach_shared_factors_and_cores():
    enc = vit()
    freeze_backbone(enc)
    factors = FacTFactors([32], rank=4)
    attach_fact(enc, factors, dropout=0.0)
    enc(torch.rand(1, 3, 64, 64)).square().mean().backward()
    assert factors.factors["32"].v.weight.grad.abs().sum() > 0  # V is zero: its gradient is not
    assert all(p.grad is not None for n, p in enc.named_parameters() if ".cores." in n)


def test_adapter3d_zero_init_and_reference_init():
    x = torch.randn(10, 4, 4, 16)
    ctx = EncoderContext(images=torch.zeros(10, 3, 8, 8), num_slices=5)
    assert torch.equal(Adapter3D(16, 8, zero_init_up=True)(x, ctx), torch.zeros_like(x))
    assert Adapter3D(16, 8)(x, ctx).abs().sum() > 0


@pytest.mark.parametrize("layout", ["vit", "flat"])
def test_slice_mixing_reaches_the_neighbours_only(layout):
    torch.manual_seed(0)
    a = Adapter3D(16, 8, kernel=(3, 1, 1))
    x = torch.randn(10, 4, 4, 16)  # 2 stacks of 5 slices, 4x4 tokens
    y = x.clone()
    y[7, 1, 2] += 5.0  # stack 1, slice 2, token (1, 2)
    if layout == "flat":
        x, y = x.reshape(10, 16, 16), y.reshape(10, 16, 16)
    ctx = EncoderContext(images=torch.zeros(10, 3, 8, 8), num_slices=5)
    with torch.no_grad():
        diff = (a(y, ctx) - a(x, ctx)).abs().reshape(10, 4, 4, 16).amax(-1)
    changed = (diff > 0).nonzero().tolist()
    assert changed == [[6, 1, 2], [7, 1, 2], [8, 1, 2]]  # slices 1, 2, 3 of that stack, that token only
    wide = Adapter3D(16, 8, kernel=(3, 3, 3), grid=(4, 4))
    with torch.no_grad():
        d = (wide(y, ctx) - wide(x, ctx)).abs().reshape(10, 4, 4, 16).amax(-1) > 0
    assert d[6:9, 0:3, 1:4].all() and d.sum() == 27  # a 3x3x3 neighbourhood
    with pytest.raises(ImedsamError, match="grid"):
        Adapter3D(16, 8, kernel=(3, 3, 3))(x.reshape(10, 16, 16), ctx)


def test_in_an_encoder_one_slice_reaches_its_neighbours_through_one_adapter():
    enc = vit()
    freeze_backbone(enc)
    attach_adapter3d(enc, hidden=8, positions=("pre_attn",), blocks=[0])
    torch.manual_seed(1)
    for p in enc.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    x = torch.rand(5, 3, 64, 64)
    y = x.clone()
    y[2] = torch.rand(3, 64, 64)
    with torch.no_grad():
        a, b = enc(x, num_slices=5), enc(y, num_slices=5)
    moved = (a - b).flatten(1).abs().amax(1) > 1e-6
    assert moved.tolist() == [False, True, True, True, False]
    with torch.no_grad():  # as 5 separate images (D = 1) nothing crosses
        a1, b1 = enc(x, num_slices=1), enc(y, num_slices=1)
    assert ((a1 - b1).flatten(1).abs().amax(1) > 1e-6).tolist() == [False, False, True, False, False]
