"""``--preprocess official``: imedsam reproduces MedSAM-lite's own inference script bit for bit (mask Dice 1.0)
on images that are neither square nor 256 px, where imedsam's default pipeline differs from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.datapaths import SHARED_DATA
from tests.reference import official_litemedsam, opencv, single_thread

from imedsam.errors import ImedsamError


def official_script_mask(official, img_3c: np.ndarray, box: list[float]) -> np.ndarray:
    """MedSAM-lite's ``CVPR24_LiteMedSAM_infer.py`` for one 2D image and one box, transcribed step by step:
    ``resize_longest_side`` (cv2.INTER_AREA on the uint8 image), min-max normalisation of the resized image,
    ``pad_image``, ``resize_box_to_256`` (``int(coord * 256 / max(H, W))``), the mask decoder with
    ``multimask_output=False``, ``postprocess_masks`` (crop to the resized size, bilinear to (H, W)) and
    ``sigmoid > 0.5``."""
    cv2 = opencv()
    height, width = img_3c.shape[:2]
    scale = 256 / max(height, width)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    img_256 = cv2.resize(img_3c, (new_w, new_h), interpolation=cv2.INTER_AREA)
    img_256_norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    img_256_padded = np.pad(img_256_norm, ((0, 256 - new_h), (0, 256 - new_w), (0, 0)))
    tensor = torch.tensor(img_256_padded).float().permute(2, 0, 1).unsqueeze(0)
    box256 = np.array([int(c * 256 / max(height, width)) for c in box], dtype=np.float64)[None]
    with torch.no_grad():
        embedding = official["image_encoder"](tensor)
        box_torch = torch.as_tensor(box256, dtype=torch.float)[:, None, :]
        sparse, dense = official["prompt_encoder"](points=None, boxes=box_torch, masks=None)
        low_res, _ = official["mask_decoder"](image_embeddings=embedding,
                                              image_pe=official["prompt_encoder"].get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=False)
        low_res = low_res[..., :new_h, :new_w]
        logits = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits).squeeze().numpy() > 0.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def _images() -> list[tuple[str, np.ndarray, list[float]]]:
    """(name, uint8 (H, W, 3), box X0 Y0 X1 Y1): pydicom's CT slice cropped and resized to odd, non-square
    sizes (smaller and larger than 256), and the SAM-Med2D demo slices of other sizes when the data is here."""
    from imedsam import io
    from imedsam.io.samples import embedded_ct_slice

    ct = io.to_display_rgb(io.read(embedded_ct_slice()), window="soft_tissue")[:, 10:117]  # 128 x 107
    out = []
    for width, height in ((107, 128), (301, 177), (190, 233), (517, 389)):
        img = np.asarray(Image.fromarray(ct).resize((width, height), Image.BICUBIC))
        sx, sy = width / 107, height / 128
        out.append((f"ct_{width}x{height}", img, [30 * sx, 3 * sy, 71 * sx, 47 * sy]))
    demo = SHARED_DATA / "sammed2d-demo"
    for stem, box in (("amos_0507_31", [60, 80, 200, 230]), ("s0114_111", [40, 30, 150, 120]),
                      ("s0619_32", [20, 40, 110, 130])):
        path = demo / "images" / f"{stem}.png"
        if path.exists():
            out.append((stem, np.asarray(Image.open(path).convert("RGB")), box))
    return out


def test_official_pipeline_gives_the_official_scripts_masks() -> None:
    from imedsam.infer.segmenter import Segmenter

    official = official_litemedsam()
    ours = Segmenter("litemedsam", preprocess="official", device="cpu", precision="fp32")
    default = Segmenter("litemedsam", device="cpu", precision="fp32")
    differs = 0
    with single_thread():
        for name, img, box in _images():
            want = official_script_mask(official, img, box)
            ours.set_image(img)
            got = ours.predict(box=box).masks[0]
            assert got.shape == want.shape == img.shape[:2], name
            assert 0 < want.sum() < want.size, name  # a real mask
            assert _dice(got, want) == 1.0, (name, _dice(got, want), int((got != want).sum()))
            default.set_image(img)
            differs += int(not np.array_equal(default.predict(box=box).masks[0], want))
    assert differs > 0  # the two pipelines do differ on these images: the test is not trivially passing


def test_official_pipeline_floors_the_box_with_one_ratio() -> None:
    from imedsam.sam.model import Preprocess
    from imedsam.sam.prepare import prepare_image, to_input_coords

    opencv()
    img = np.random.default_rng(0).integers(0, 256, (177, 301, 3), dtype=np.uint8)
    official = prepare_image(img, Preprocess(img_size=256, normalize="minmax", pipeline="official"))
    ours = prepare_image(img, Preprocess(img_size=256, normalize="minmax"))
    assert official.input_size == ours.input_size == (151, 256)
    box = np.array([10.3, 20.7, 100.9, 150.2])
    ratio = 256 / 301
    np.testing.assert_array_equal(to_input_coords(box, official), [int(c * ratio) for c in box])
    np.testing.assert_allclose(to_input_coords(box, ours), box * np.array([256 / 301, 151 / 177] * 2))
    assert official.tensor.shape == (1, 3, 256, 256) and float(official.tensor[..., 151:, :].abs().max()) == 0


def test_official_pipeline_only_for_litemedsam(tmp_path, capsys) -> None:
    from imedsam.cli import main
    from imedsam.models.registry import build_system

    with pytest.raises(ImedsamError, match="for LiteMedSAM"):
        build_system("tiny_vit_test", preprocess="official")
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(image)
    code = main(["segment", str(image), "--model", "mobilesam", "--preprocess", "official", "--box", "1", "1",
                 "9", "9", "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--preprocess official" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.png").exists()
