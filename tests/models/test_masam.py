"""MA-SAM: the exact reference counts of the official code, the released checkpoint layout (tuned tensors only)
loaded from random tensors of exactly its names and shapes, and the multi-class decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.models.masam import MASAMConfig, build_masam, load_official, upscale_channels
from imedsam.models.registry import parameter_breakdown

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-checkpoints"


@pytest.mark.parametrize("backbone, total", [("sam_vit_b", 30_142_361), ("sam_vit_h", 96_811_929)])
def test_reference_counts_are_the_official(backbone, total):
    p = parameter_breakdown("ma_sam", backbone=backbone, mode="reference", num_classes=12)
    assert p["img_size"] == 512 and p["total_trainable"] == total
    assert p["trainable"]["mask decoder"] == 5_243_725 and p["trainable"]["prompt encoder"] == 6_220
    layers = {"sam_vit_b": 12, "sam_vit_h": 32}[backbone]
    width = {"sam_vit_b": 768, "sam_vit_h": 1280}[backbone]
    assert p["trainable"]["FacT (U, V, cores)"] == 2 * 32 * width + 2 * layers * 32 * 32
    per_adapter = 2 * width + 2 * width * 384 + 384 * 384 * 3 + 384
    assert p["trainable"]["3-D adapters"] == 2 * layers * per_adapter


def test_progressive_upsampling_reaches_the_input():
    assert upscale_channels(256, 512, 32) == (64, 32, 16, 8)  # MA-SAM at 512 on a ViT: 16x
    assert upscale_channels(256, 256, 64) == (64, 32)  # LiteMedSAM: SAM's own head
    with pytest.raises(ImedsamError, match="power-of-two"):
        upscale_channels(256, 96, 32)


def test_released_checkpoint_loads_every_tuned_tensor(tmp_path):
    shapes = json.loads((FIXTURES / "ma_sam_vit_b_r32_12cls_saved.json").read_text())
    state = {k: torch.full(v, 0.01) for k, v in shapes.items()}
    state["q_FacTs_007"].fill_(0.5)
    state["image_encoder.ImageEncoderViT.blocks.3.Block.adapter_conv_2.bias"].fill_(-2.0)
    state["mask_decoder.mask_tokens.weight"].fill_(3.0)
    path = tmp_path / "masam_btcv.pth"
    torch.save(state, path)
    cfg = MASAMConfig(backbone="sam_vit_b", mode="reference", decoder={"num_classes": 12})
    system = build_masam(cfg, pretrained=False)
    load_official(system, path)
    own = system.state_dict()
    assert torch.all(own["image_encoder.blocks.7.attn.qkv.cores.q.weight"] == 0.5)
    assert torch.all(own["image_encoder.blocks.3.post_attn.adapter3d.conv.bias"] == -2.0)
    assert torch.all(own["mask_decoder.mask_tokens.weight"] == 3.0)
    assert torch.all(own["fact.factors.768.u.weight"] == 0.01)
    for name, param in system.named_parameters():  # every trainable tensor came from the file
        if param.requires_grad:
            p = param.detach()
            assert bool(((p == 0.01) | (p == 0.5) | (p == -2.0) | (p == 3.0)).all()), name
    del state["v_FacTs_011"]
    torch.save(state, path)
    with pytest.raises(ImedsamError, match="1 missing"):
        load_official(build_masam(cfg, pretrained=False), path)


def test_multiclass_logits_on_stacks_and_gradients():
    torch.manual_seed(0)
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", decoder={"num_classes": 3}, stack_depth=3),
                         pretrained=False)
    x = torch.rand(6, 3, 64, 64)  # 2 stacks of 3 slices
    logits = system.class_logits(system.encode(x, num_slices=3))
    assert logits.shape == (6, 4, 64, 64)
    logits.logsumexp(1).mean().backward()
    trained = [n for n, p in system.named_parameters() if p.requires_grad]
    assert any(".adapter3d." in n for n in trained) and any(".cores." in n for n in trained)
    assert not any(p.grad is not None for n, p in system.named_parameters() if not p.requires_grad)
    boxed = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", decoder={"num_classes": 2, "prompt": "box"}),
                        pretrained=False)
    assert boxed.prompt_types == {"box"} and not boxed.prompt_free
    out = boxed.class_logits(boxed.encode(torch.rand(2, 3, 64, 64)), boxes=torch.tensor([[4.0, 4, 40, 40]] * 2))
    assert out.shape == (2, 3, 64, 64)
