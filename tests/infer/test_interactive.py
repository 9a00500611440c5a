"""Interactive refinement (refine / undo / reset) and automatic mode (grid of point prompts: filtering, NMS, label
map), on a tiny random SAM-Med2D and on an oracle system whose answers are known."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.infer.automatic import AutoSettings, box_nms, generate_masks, label_map, point_grid, stability_score
from imedsam.infer.segmenter import Segmenter
from imedsam.models.sam import SamDecoding
from imedsam.models.sammed2d import SamMed2DConfig, build_sammed2d
from imedsam.sam.model import Preprocess


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    system = build_sammed2d(SamMed2DConfig(backbone="tiny_tinyvit_test", peft={"zero_init": False}),
                            pretrained=False)
    seg = Segmenter(system, device="cpu", precision="fp32")
    seg.set_image(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return seg


def test_refine_keeps_clicks_and_feeds_back_the_previous_logits(segmenter):
    seg = segmenter
    seg.reset()
    first = seg.refine(box=(8, 6, 40, 30))
    second = seg.refine(point=(20, 15), label=0)
    third = seg.refine(point=(30, 20), label=1)
    assert [len(h.clicks) for h in seg.history] == [0, 1, 2] and seg.history[-1].box == (8, 6, 40, 30)
    manual = seg.predict(box=(8, 6, 40, 30), points=np.array([[20, 15], [30, 20]]), point_labels=np.array([0, 1]),
                         mask_input=second.low_res_logits[:1])
    np.testing.assert_allclose(third.logits, manual.logits, atol=1e-5)  # box + all clicks + previous logits
    without = seg.predict(box=(8, 6, 40, 30), points=np.array([[20, 15], [30, 20]]), point_labels=np.array([0, 1]))
    assert not np.allclose(third.logits, without.logits)  # the mask prompt does something
    back = seg.undo()
    np.testing.assert_array_equal(back.logits, second.logits)
    assert len(seg.history) == 2
    seg.undo()
    np.testing.assert_array_equal(seg.history[-1].prediction.logits, first.logits)
    seg.reset()
    assert seg.history == [] and seg.undo() is None
    with pytest.raises(ImedsamError, match="label"):
        seg.refine(point=(3, 3), label=2)


def test_mask_prompt_from_a_mask_of_the_image(segmenter):
    mask = np.zeros((48, 64), bool)
    mask[10:30, 12:40] = True
    pred = segmenter.predict(points=np.array([[20, 20]]), point_labels=np.array([1]), mask_input=mask)
    assert pred.masks.shape == (1, 48, 64)
    with pytest.raises(ImedsamError, match="--mask-input"):
        segmenter.predict(points=np.array([[20, 20]]), mask_input=np.zeros((10, 10), bool))


class Oracle(SamDecoding):
    """Answers a point with the blob under it (logit +8 inside, -8 outside), a second candidate = every blob
    (score 0.5), a third empty one; blob 2 is 'soft' (logits +-0.5: unstable). Points off the blobs get the
    background with score 0.3."""

    name: ClassVar[str] = "oracle"

    def __init__(self, labels: np.ndarray, soft: int) -> None:
        super().__init__()
        self.labels = torch.from_numpy(labels)
        self.soft = soft
        self.preprocess = Preprocess(img_size=labels.shape[0], normalize="minmax")
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, images, valid_hw=None):
        return torch.zeros(images.shape[0], 1, 1, 1)

    def sam_masks(self, embeddings, prompts, multimask):
        pts = prompts.points[:, 0].round().long()
        ids = self.labels[pts[:, 1].clamp(0, 63), pts[:, 0].clamp(0, 63)]
        own = (self.labels[None] == ids[:, None, None]).float()
        scale = torch.where(ids == self.soft, 0.5, 8.0)[:, None, None]
        logits = torch.stack([(2 * own - 1) * scale, (2 * (self.labels[None] > 0).float() - 1).expand_as(own) * 8,
                              torch.full_like(own, -8.0)], 1)
        iou = torch.stack([torch.where(ids > 0, 0.95, 0.3), torch.full_like(ids, 0.5, dtype=torch.float),
                           torch.full_like(ids, 0.99, dtype=torch.float)], 1)
        return logits, iou


def test_automatic_mode_finds_the_blobs_once_each():
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int64)
    for k, (cy, cx, r) in enumerate([(16, 16, 9), (44, 20, 7), (30, 46, 12)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    seg = Segmenter(Oracle(labels, soft=2), device="cpu", precision="fp32")
    seg.set_image((labels > 0).astype(np.uint8) * 200)
    masks = generate_masks(seg, AutoSettings(points_per_side=16, pred_iou_thresh=0.88))
    assert len(masks) == 2  # blobs 1 and 3; the soft blob 2 is unstable; duplicates suppressed
    found = label_map(masks, (64, 64))
    assert found.max() == 2
    for k in (1, 3):
        assert any(np.array_equal(found == i, labels == k) for i in (1, 2))
    assert np.array_equal(found == 1, labels == 3)  # the larger object first
    loose = generate_masks(seg, AutoSettings(points_per_side=16, stability_score_thresh=0.0))
    assert len(loose) == 3


def test_grid_stability_and_nms_pieces():
    g = point_grid(2, (10, 20))
    assert g.tolist() == [[5.0, 2.5], [15.0, 2.5], [5.0, 7.5], [15.0, 7.5]]
    logits = torch.tensor([[[2.0, 0.5, -2.0]], [[9.0, 9.0, -9.0]]])
    assert stability_score(logits, 1.0).tolist() == [0.5, 1.0]
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    assert box_nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.7) == [1, 2]
