"""The assembled I-MedSAM system on tiny random backbones."""

import numpy as np
import pytest
import torch

from imedsam.infer.segmenter import Segmenter
from imedsam.models.imedsam import IMedSAMConfig as ModelConfig
from imedsam.models.imedsam import IMedSAMDecoderConfig as DecoderSettings
from imedsam.models.imedsam import build_imedsam
from imedsam.models.registry import build_system, parameter_breakdown
from imedsam.peft import PeftConfig as PeftSettings


@pytest.mark.parametrize("backbone", ["tiny_vit_test", "tiny_tinyvit_test"])
def test_any_output_grid_and_uncertainty(backbone):
    torch.manual_seed(0)
    seg = Segmenter("imedsam", backbone=backbone, device="cpu", precision="fp32")
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)  # padded (non-square) input
    seg.set_image(image)
    for size in [(37, 53), (17, 23), (1, 1), (96, 64)]:
        pred = seg.predict(box=(5, 5, 30, 30), size=size, uncertainty=True)
        assert pred.masks.shape == (1, *size) and pred.uncertainty.shape == size
    big = seg.predict(box=(5, 5, 30, 30), size=(300, 400), uncertainty=True)
    assert float(big.uncertainty.max()) > 0  # MC dropout is live at inference (paper mode)
    again = seg.predict(box=(5, 5, 30, 30), size=(300, 400), uncertainty=True)
    np.testing.assert_array_equal(big.uncertainty, again.uncertainty)  # seeded


@pytest.mark.parametrize("peft", [dict(frequency=False), dict(lora_rank=0), dict(frequency=False, lora_rank=0)])
def test_predicts_without_either_adapter(peft):
    """Ablations: LoRA alone, the frequency adapter alone, neither (the padded input reaches only the FA)."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="tiny_vit_test", img_size=64, peft=PeftSettings(**peft))
    seg = Segmenter(build_imedsam(config, pretrained=False), device="cpu", precision="fp32")
    seg.set_image(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    pred = seg.predict(box=(5, 5, 30, 30), uncertainty=True)
    assert pred.masks.shape == (1, 37, 53) and np.isfinite(pred.uncertainty).all()


def test_reference_mode_vit_b_has_the_papers_parameter_count():
    counts = parameter_breakdown("imedsam", backbone="sam_vit_b", mode="reference", img_size=384)
    assert counts["total_trainable"] == 1_595_742
    assert counts["total"] == 92_525_154  # the independent total at 384 (systems.md A.5)


def test_sam_prior_with_zero_gate_starts_as_the_zero_shot_backbone():
    torch.manual_seed(0)
    base = build_system("tiny_tinyvit_test")
    config = ModelConfig(backbone="tiny_tinyvit_test", peft=PeftSettings(fa_gate_init=0.0),
                         decoder=DecoderSettings(sam_prior=True, coarse_hidden=(32, 16), coarse_feature_dim=8,
                                                 fine_hidden=(16, 16)))
    torch.manual_seed(0)  # the same random backbone weights as `base` (built first, from the same seed)
    adapted = build_imedsam(config, pretrained=False)
    torch.testing.assert_close(adapted.mask_decoder.iou_token.weight, base.sam.mask_decoder.iou_token.weight)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    zero_shot, ours = Segmenter(base, device="cpu", precision="fp32"), Segmenter(adapted, device="cpu",
                                                                                 precision="fp32")
    zero_shot.set_image(image)
    ours.set_image(image)
    a = zero_shot.predict(box=(10, 12, 40, 50))
    b = ours.predict(box=(10, 12, 40, 50))
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    # and it trains away from there: the gate and the logit heads receive gradient
    images = torch.rand(1, 3, 64, 64)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 10:40, 12:50] = 1
    adapted.train()
    coarse, fine, targets = adapted.forward_train(images, torch.tensor([[12.0, 10, 49, 39]]), masks, n_points=64)
    torch.nn.functional.binary_cross_entropy_with_logits(fine, targets).backward()
    gates = [m.gate.grad for m in adapted.image_encoder.modules() if type(m).__name__ == "FrequencyAdapter"]
    assert all(g is not None for g in gates) and any(float(g.abs()) > 0 for g in gates)
    assert float(adapted.decoder.coarse_heads[0].weight.grad[0].abs().sum()) > 0


@pytest.mark.parametrize("shape", [(64, 64), (48, 64)])
def test_adaptive_decoding_with_the_sam_prior_keeps_the_prior_prediction(shape):
    """At init the residual is 0: adaptive decoding (steered by the prior) must give the prior's prediction.

    A square image is decoded on the exact output grid; a non-square (padded) one on the padded frame at the
    output's pitch, then cropped: pixel centres move by under half an output pixel."""
    from imedsam.models.imedsam import set_adaptive_decoding

    torch.manual_seed(0)
    config = ModelConfig(backbone="tiny_tinyvit_test", peft=PeftSettings(fa_gate_init=0.0),
                         decoder=DecoderSettings(sam_prior=True, coarse_hidden=(32, 16), coarse_feature_dim=8,
                                                 fine_hidden=(16, 16)))
    system = build_imedsam(config, pretrained=False)
    seg = Segmenter(system, device="cpu", precision="fp32")
    seg.set_image(np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8))
    size = (shape[0] * 8, shape[1] * 8)
    exact = seg.predict(box=(10, 12, 40, 40), size=size, uncertainty=True)
    set_adaptive_decoding(system)
    adaptive = seg.predict(box=(10, 12, 40, 40), size=size, uncertainty=True)
    assert adaptive.uncertainty.shape == size and adaptive.masks.shape == (1, *size)
    if shape[0] == shape[1]:
        np.testing.assert_allclose(adaptive.logits, exact.logits, atol=1e-4)
    else:
        assert 0 < exact.masks.sum() < exact.masks.size
        assert (adaptive.masks == exact.masks).mean() > 0.99


def test_train_transformer_trains_saves_and_reloads_the_two_way_transformer(tmp_path):
    """Off by default (I-MedSAM freezes it); on, the transformer and tokens get gradients (all of them with the
    SAM prior, which reads the mask token; without it the token-only layers get none), are saved with the
    adapter and come back on load, so a reloaded run predicts exactly as the trained one."""
    small = DecoderSettings(coarse_hidden=(32, 16), coarse_feature_dim=8, fine_hidden=(16, 16))
    frozen = build_imedsam(ModelConfig(backbone="tiny_tinyvit_test", decoder=small), pretrained=False)
    assert not any(p.requires_grad for p in frozen.mask_decoder.transformer.parameters())
    torch.manual_seed(0)
    config = ModelConfig(backbone="tiny_tinyvit_test",
                         decoder=small.model_copy(update={"train_transformer": True, "sam_prior": True}))
    system = build_imedsam(config, pretrained=False)
    images, masks = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    masks[..., 10:40, 12:50] = 1
    coarse, fine, targets = system.forward_train(images, torch.tensor([[12.0, 10, 49, 39]]), masks, n_points=64)
    torch.nn.functional.binary_cross_entropy_with_logits(fine, targets).backward()
    for module in (system.mask_decoder.transformer, system.mask_decoder.mask_tokens):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    extra = sum(p.numel() for p in system.parameters() if p.requires_grad) - sum(
        p.numel() for p in frozen.parameters() if p.requires_grad)
    parts = (system.mask_decoder.transformer, system.mask_decoder.iou_token, system.mask_decoder.mask_tokens)
    assert extra == sum(p.numel() for m in parts for p in m.parameters())

    with torch.no_grad():  # a "trained" transformer: different from the base weights the reload starts from
        for p in system.mask_decoder.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    system.save_trainable(tmp_path / "adapter.safetensors")
    torch.manual_seed(0)  # the same random frozen weights as `system`; the trained ones come from the file
    reloaded = build_system(adapter=tmp_path / "adapter.safetensors", pretrained=False)
    torch.testing.assert_close(reloaded.mask_decoder.transformer.state_dict(),
                               system.mask_decoder.transformer.state_dict())
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    preds = []
    for model in (system, reloaded):
        seg = Segmenter(model, device="cpu", precision="fp32")
        seg.set_image(image)
        preds.append(seg.predict(box=(10, 12, 40, 50)).logits)
    np.testing.assert_array_equal(preds[0], preds[1])
