"""Evaluation cases: an image, one object's ground truth, its spacing and prompt box, from any dataset.

:class:`EvalCase` is what the prompt protocols (:mod:`imedsam.data.interaction`), validation during training and
``imedsam evaluate`` consume; :func:`dataset_cases` turns a :class:`~imedsam.data.dataset.SegmentationDataset`
(one item per image or slice and class) into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imedsam.data.prompts import box_from_mask

__all__ = ["EvalCase", "dataset_cases", "resize_nearest", "split_components"]


@dataclass
class EvalCase:
    """One prompt target: an image, a binary ground truth on the same grid, and its pixel spacing (or None).

    ``box`` is the prompt (half-open xyxy in the image's pixels; default the tight box of ``gt``). ``gt_native`` is
    an optional ground truth of the same object on another (usually finer) grid of the same field of view, e.g.
    the original-resolution mask of a down-sampled dataset (``--gt-dir``): when given, it is what predictions are
    scored against and its grid is the case's native grid.
    """

    case_id: str
    image: np.ndarray  # (H, W, 3) uint8 display RGB
    gt: np.ndarray  # (H, W) bool
    spacing: tuple[float, float] | None = None
    gt_native: np.ndarray | None = None  # (H_n, W_n) bool
    box: np.ndarray | None = None
    stem: str | None = None  # the dataset file stem the case comes from
    class_id: int = 1
    slice_index: int | None = None

    @property
    def image_id(self) -> str:
        """The image (or slice) the case is an object of: per-image means group by it."""
        stem = self.stem if self.stem is not None else self.case_id.split("#c")[0]
        return stem if self.slice_index is None else f"{stem}#z{self.slice_index}"

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple((self.gt if self.gt_native is None else self.gt_native).shape)

    def prompt_box(self) -> np.ndarray:
        return box_from_mask(self.gt) if self.box is None else np.asarray(self.box, dtype=np.float64)

    def gt_on(self, grid: tuple[int, int]) -> np.ndarray:
        """The ground truth on ``grid``: ``gt_native`` (else ``gt``) resized with nearest-neighbour."""
        return resize_nearest(self.gt if self.gt_native is None else self.gt_native, grid)


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) mask to ``size`` (pixel centres, as F.interpolate 'nearest-exact')."""
    if tuple(mask.shape) == tuple(size):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy() > 0.5


def dataset_cases(dataset, limit: int | None = None):
    """Turn ``SegmentationDataset`` items (original size) into evaluation cases; each keeps its item's box
    (tight, or jittered when the dataset jitters boxes)."""
    cases = []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        image = np.clip(item["image"].numpy().transpose(1, 2, 0), 0, 255).astype(np.uint8)
        gt = item["mask"].numpy()[0] > 0.5
        name = str(item["case_id"])
        if int(item.get("slice_index", -1)) >= 0:
            name += f"#z{int(item['slice_index'])}"
        if int(item.get("class_id", 1)) != 1:
            name += f"#c{int(item['class_id'])}"
        spacing = item["spacing"].tolist() if "spacing" in item else [float("nan")] * 2
        known = all(np.isfinite(spacing))
        slice_index = int(item.get("slice_index", -1))
        cases.append(EvalCase(case_id=name, image=image, gt=gt, spacing=tuple(spacing) if known else None,
                              box=item["box"].numpy().astype(np.float64), stem=str(item["case_id"]),
                              class_id=int(item.get("class_id", 1)),
                              slice_index=slice_index if slice_index >= 0 else None))
    return cases


def split_components(cases: list[EvalCase], min_pixels: int = 1) -> list[EvalCase]:
    """One case per 8-connected component of each case's ground truth (``--objects components``): a label map's
    class made of separate objects becomes one prompt target per object (``<case>#k1``, ``#k2``...). Components
    under ``min_pixels`` are dropped; a case with a single component keeps its id. The prompt box becomes the
    component's tight box (a jittered box cannot be split and is recomputed)."""
    from scipy import ndimage

    out = []
    for case in cases:
        labels, n = ndimage.label(case.gt, structure=np.ones((3, 3), dtype=bool))
        parts = [labels == k for k in range(1, n + 1) if int((labels == k).sum()) >= min_pixels]
        if len(parts) <= 1:
            out.append(case)
            continue
        for k, part in enumerate(parts, start=1):
            out.append(EvalCase(case_id=f"{case.case_id}#k{k}", image=case.image, gt=part, spacing=case.spacing,
                                box=None, stem=case.stem, class_id=case.class_id, slice_index=case.slice_index))
    return out
