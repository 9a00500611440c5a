"""SAM-Med2D: the adapter (formula, zero init, flat TinyViT tokens), the exact reference parameter counts, the
official checkpoint layout loaded strictly from random tensors of exactly its names and shapes, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.models.registry import build_system, parameter_breakdown
from imedsam.models.sammed2d import SamMed2DConfig, build_sammed2d, map_official_keys
from imedsam.peft.med2d import Med2DAdapter
REFERENCE_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "reference-checkpoints" / "sam_med2d_vit_b.json"


def test_adapter_formula_channel_then_spatial_then_layernorm():
    torch.manual_seed(0)
    a = Med2DAdapter(16, adapter_dim=4, se_reduction=4)
    h = torch.randn(2, 6, 6, 16)
    z = h.permute(0, 3, 1, 2)
    w = torch.sigmoid(a.channel[2].weight @ torch.relu(a.channel[0].weight @ z.mean((2, 3)).T)).T  # (N, C)
    zc = z * w[:, :, None, None]
    s = torch.relu(torch.nn.functional.conv_transpose2d(
        torch.relu(torch.nn.functional.conv2d(zc, a.spatial[0].weight, stride=2, padding=1)),
        a.spatial[2].weight, stride=2, padding=1))
    expected = torch.nn.functional.layer_norm((z + s).permute(0, 2, 3, 1), (16,), a.norm.weight, a.norm.bias)
    torch.testing.assert_close(a(h), expected, rtol=1e-5, atol=1e-5)
    # shapes: conv (d, C, 3, 3), transposed conv (d, C, 4, 4) as the official full-width (768, 768, ...)
    assert a.spatial[0].weight.shape == (4, 16, 3, 3) and a.spatial[2].weight.shape == (4, 16, 4, 4)
    assert a.channel[0].weight.shape == (4, 16) and a.channel[2].weight.shape == (16, 4)


def test_zero_init_adds_nothing_and_flat_odd_grids_work():
    torch.manual_seed(0)
    zero = Med2DAdapter(8, 4, 2, zero_init=True, grid=(5, 7))
    h = torch.randn(3, 35, 8)  # TinyViT layout (N, H*W, C), odd sides: the spatial branch crops back
    assert torch.equal(zero(h), torch.zeros_like(h))
    live = Med2DAdapter(8, 4, 2, zero_init=False, grid=(5, 7))
    out = live(h)
    assert out.shape == h.shape and out.abs().sum() > 0
    with pytest.raises(ImedsamError, match="grid"):
        live(torch.randn(1, 36, 8))


def test_reference_count_vit_b_256_is_exactly_the_official():
    p = parameter_breakdown("sam_med2d", backbone="sam_vit_b", mode="reference")
    assert p["img_size"] == 256
    assert p["trainable"] == {"adapters": 180_504_576, "prompt encoder": 6_220, "mask decoder": 4_058_340}
    assert p["total_trainable"] == 184_569_136
    light = parameter_breakdown("sam_med2d", backbone="sam_vit_b")
    assert light["trainable"]["adapters"] == 12 * (768 * 16 * 9 + 16 * 768 * 16 + 2 * 768 * 48 + 2 * 768)
    lite = parameter_breakdown("sam_med2d")  # LiteMedSAM: adapters in the 10 attention blocks
    widths = [128] * 2 + [160] * 6 + [320] * 2
    assert lite["trainable"]["adapters"] == sum(25 * 16 * c + 2 * c * (c // 16) + 2 * c for c in widths)


def test_official_checkpoint_loads_strictly_with_every_key_mapped(tmp_path):
    shapes = json.loads(REFERENCE_JSON.read_text())
    state = {k: torch.zeros(v) for k, v in shapes.items()}
    marks = {"image_encoder.blocks.7.Adapter.spatial.2.weight": 0.25, "image_encoder.pos_embed": 0.5,
             "mask_decoder.iou_token.weight": -1.0, "prompt_encoder.point_embeddings.1.weight": 2.0}
    for k, v in marks.items():
        state[k].fill_(v)
    path = tmp_path / "sam-med2d_b.pth"
    torch.save({"model": state, "epoch": 15}, path)
    system = build_system("sam_med2d", checkpoint=path)  # the default config (paper, LiteMedSAM) is replaced
    cfg = system.config
    assert (cfg.backbone, cfg.mode, cfg.img_size, cfg.peft.adapter_dim, cfg.peft.se_reduction) == \
        ("sam_vit_b", "reference", 256, "full", 4)
    own = system.state_dict()
    assert set(own) == set(map_official_keys(state))  # nothing missing, nothing left over
    for k, v in marks.items():
        assert torch.all(own[k.replace(".Adapter.", ".mlp_parallel.med2d.")] == v), k
    del state["image_encoder.blocks.3.Adapter.norm.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(ImedsamError, match="missing"):
        build_system("sam_med2d", checkpoint=path)


def _tiny(backbone: str = "tiny_tinyvit_test", **peft) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sammed2d(SamMed2DConfig(backbone=backbone, peft=peft), pretrained=False)


def test_only_adapters_prompt_encoder_and_mask_decoder_train():
    system = _tiny()
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp_parallel.med2d." in n or n.startswith(("prompt_encoder.", "mask_decoder."))
                             for n in trainable)
    assert any(n.startswith("prompt_encoder.mask_downscaling.") for n in trainable)
    assert any(n.startswith("prompt_encoder.point_embeddings.") for n in trainable)
    groups = system.param_groups()
    assert sum(p.numel() for p in groups["adapters"]) == sum(p.numel() for n, p in system.named_parameters()
                                                             if ".mlp_parallel.med2d." in n)


@pytest.mark.parametrize("backbone", ["tiny_tinyvit_test", "tiny_vit_test"])
def test_decode_keeps_the_best_predicted_iou_of_three(backbone):
    from imedsam.infer.segmenter import Segmenter

    system = _tiny(backbone, zero_init=False)
    assert system.preprocess.img_size == (256 if backbone == "tiny_vit_test" else 64)  # ViTs: SAM-Med2D's 256
    seg = Segmenter(system, device="cpu", precision="fp32")
    seg.set_image(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    three = seg.predict(box=(5, 5, 40, 30), multimask=True)
    one = seg.predict(box=(5, 5, 40, 30))
    assert three.masks.shape == (3, 48, 64) and one.masks.shape == (1, 48, 64)
    best = int(np.argmax(three.scores))
    np.testing.assert_allclose(one.logits[0], three.logits[best], atol=1e-5)
    assert one.low_res_logits is not None and one.low_res_logits.shape[0] == 1


def test_a_run_of_another_system_is_refused_by_name(tmp_path):
    system = _tiny()
    system.save_trainable(tmp_path / "adapter.safetensors")
    with pytest.raises(ImedsamError, match="trained as model 'sam_med2d'"):
        build_system("imedsam", adapter=tmp_path, pretrained=False)
    torch.manual_seed(0)
    again = build_system(adapter=tmp_path, pretrained=False)
    for (n, a), b in zip(system.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
