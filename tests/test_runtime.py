"""Runtime choices: storing frozen weights in the autocast dtype for inference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imedsam.infer.segmenter import Segmenter
from imedsam.models.registry import build_system
from imedsam.runtime import cast_frozen_weights


def test_cast_frozen_weights_touches_only_fully_frozen_linear_and_conv() -> None:
    frozen_lin, frozen_conv, trainable = nn.Linear(4, 3), nn.Conv2d(2, 2, 3), nn.Linear(3, 2)
    norm = nn.LayerNorm(3)
    for mod in (frozen_lin, frozen_conv, norm):
        mod.requires_grad_(False)
    model = nn.ModuleList([frozen_lin, frozen_conv, trainable, norm])
    assert cast_frozen_weights(model, None) == 0 and frozen_lin.weight.dtype == torch.float32
    assert cast_frozen_weights(model, torch.bfloat16) == 2
    assert frozen_lin.weight.dtype == frozen_lin.bias.dtype == frozen_conv.weight.dtype == torch.bfloat16
    assert trainable.weight.dtype == torch.float32 and norm.weight.dtype == torch.float32
    assert cast_frozen_weights(model, torch.bfloat16) == 0  # idempotent


def test_segmenter_with_cast_weights_predicts_exactly_as_autocast_does() -> None:
    """Autocast rounds fp32 weights to bf16 on every call; storing them in bf16 once changes nothing."""
    image = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    torch.manual_seed(0)
    owned = Segmenter("tiny_vit_test", device="cpu", precision="bf16")  # built here: frozen, weights cast
    torch.manual_seed(0)
    system = build_system("tiny_vit_test")
    passed = Segmenter(system, device="cpu", precision="bf16")  # passed in: left in fp32
    assert owned.system.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert system.sam.image_encoder.patch_embed.proj.weight.dtype == torch.float32
    preds = []
    for seg in (owned, passed):
        seg.set_image(image)
        preds.append(seg.predict(box=(5, 6, 30, 25)).logits)
    np.testing.assert_array_equal(preds[0], preds[1])
