"""``ObjectsDataset``: one training sample per image (or slice) with several object masks, for systems that
embed an image once and answer several prompts on it (SAM-Med2D: 5 masks per image and step, systems.md §B.1).

Objects of an image are, by ``objects``:

* ``"classes"``: every class present in its label map (the SAM-Med2D JSON layout's per-object files are
  classes of one label map, :mod:`imedsam.data.folders`);
* ``"components"``: every 8-connected component of every class.

An object is kept when it has at least ``min_foreground`` pixels and at least ``min_fraction`` of the image
(SAM-Med2D's filter drops masks under 0.153 % of the image: ``min_fraction=0.00153``), counted on the original
grid. Each item draws ``masks_per_image`` of the image's objects **with replacement** (as SAM-Med2D), seeded
per item, after the seeded augmentation (applied once to the image and all its objects; an object that the
augmentation removes is not drawn).

Item layout (original size unless ``size``; see :mod:`imedsam.data.dataset`):

- ``"image"``: float32 ``(3, H, W)`` RGB on the display scale 0..255;
- ``"masks"``: float32 ``(M, H, W)`` in {0, 1}, ``M = masks_per_image``;
- ``"boxes"``: float32 ``(M, 4)`` half-open xyxy boxes of the masks (of their largest component with
  ``box_component="largest"``, SAM-Med2D), jittered when ``box_jitter`` is given;
- ``"object_ids"``: int64 ``(M,)`` the drawn objects: class ids (``"classes"``) or component numbers;
  ``"case_id"``, ``"slice_index"`` as SegmentationDataset.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from imedsam.data.augment import sample_seed
from imedsam.data.dataset import SegmentationDataset
from imedsam.data.prompts import box_from_mask, jitter_box
from imedsam.data.samples import take_slice
from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

__all__ = ["ObjectsDataset", "largest_component"]

_EIGHT = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a (H, W) bool mask (the mask itself when it has one or none)."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def object_map(labels: np.ndarray, objects: str, min_foreground: int, min_fraction: float) -> np.ndarray:
    """(H, W) label map -> (H, W) int64 map of the kept objects (0 elsewhere): their class ids (``"classes"``) or
    1..K in class then component order (``"components"``)."""
    out = np.zeros(labels.shape, dtype=np.int64)
    floor = max(int(min_foreground), int(np.ceil(min_fraction * labels.size)))
    k = 0
    for c in np.unique(labels):
        if c == 0:
            continue
        mask = labels == c
        parts = [mask] if objects == "classes" else _components(mask)
        for part in parts:
            if part.sum() >= floor:
                k += 1
                out[part] = c if objects == "classes" else k
    return out


def _components(mask: np.ndarray) -> list[np.ndarray]:
    lab, n = ndimage.label(mask, structure=_EIGHT)
    return [lab == i for i in range(1, n + 1)]


class ObjectsDataset(SegmentationDataset):
    """Images (or slices) with ``masks_per_image`` object masks each (module docstring).

    Args: those of :class:`~imedsam.data.dataset.SegmentationDataset` (``box_jitter`` applies to every box),
    plus ``masks_per_image`` (M >= 1), ``objects`` (``"classes"`` or ``"components"``), ``min_fraction`` and
    ``box_component`` (``"all"``: the tight box of the whole mask; ``"largest"``: of its largest component).
    """

    def __init__(self, source, *, masks_per_image: int = 5, objects: Literal["classes", "components"] = "classes",
                 min_fraction: float = 0.0, box_component: Literal["all", "largest"] = "all",
                 **kwargs: Any) -> None:
        if int(masks_per_image) < 1:
            raise ImedsamError(f"masks_per_image: must be >= 1, got {masks_per_image}")
        if objects not in ("classes", "components"):
            raise ImedsamError(f"data.objects: {objects!r}; use 'classes' or 'components'")
        if box_component not in ("all", "largest"):
            raise ImedsamError(f"data.box_component: {box_component!r}; use 'all' or 'largest'")
        if not 0.0 <= float(min_fraction) < 1.0:
            raise ImedsamError(f"data.min_object_fraction: must be in [0, 1), got {min_fraction}")
        super().__init__(source, **kwargs)
        self.masks_per_image = int(masks_per_image)
        self.objects, self.min_fraction, self.box_component = objects, float(min_fraction), box_component
        self.min_foreground = int(kwargs.get("min_foreground", 1))
        # one sample per (case, slice) that has at least one object
        keys = list(dict.fromkeys((r.case_index, r.slice_index) for r in self.samples))
        self.images: list[tuple[int, int | None]] = []
        for case_index, slice_index in keys:
            labels = self._labels(case_index, slice_index)
            if object_map(labels, objects, self.min_foreground, self.min_fraction).any():
                self.images.append((case_index, slice_index))
        if not self.images:
            raise ImedsamError(f"data: no image/slice has an object of >= {self.min_foreground} pixels and >= "
                               f"{self.min_fraction:g} of the image; lower data.min_foreground/min_object_fraction")
        logger.info("ObjectsDataset: %d images, %d masks each", len(self.images), self.masks_per_image)

    def __len__(self) -> int:
        return len(self.images)

    def _labels(self, case_index: int, slice_index: int | None) -> np.ndarray:
        labels = self._load(case_index)[1]
        return labels if slice_index is None else take_slice(labels, slice_index, self.axis)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, slice_index = self.images[index]
        image, labels, _ = self._load(case_index)
        if slice_index is not None:
            image, labels = take_slice(image, slice_index, self.axis), take_slice(labels, slice_index, self.axis)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        objects = object_map(labels, self.objects, self.min_foreground, self.min_fraction)
        img_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        obj_t = torch.from_numpy(objects).float()[None]
        if self.size is not None and self.size != tuple(objects.shape):
            img_t = F.interpolate(img_t[None], size=self.size, mode="bilinear", align_corners=False)[0]
            obj_t = F.interpolate(obj_t[None], size=self.size, mode="nearest-exact")[0]
        seed = self.item_seed(index)
        if self.augmenter is not None and obj_t.any():
            img_t, obj_t, _ = self.augmenter(img_t, obj_t, seed=seed, labels=True)
        ids = [int(v) for v in torch.unique(obj_t) if v > 0]
        if not ids:
            raise ImedsamError(f"{self.cases[case_index].case_id}: no object left at size {self.size}; "
                               f"use a larger data.image_size")
        rng = np.random.default_rng(sample_seed(seed, 0x0B1E))
        drawn = rng.choice(ids, size=self.masks_per_image, replace=True)
        masks = torch.stack([(obj_t[0] == k).float() for k in drawn])
        shape = tuple(masks.shape[1:])
        boxes = []
        for i, m in enumerate(masks.numpy() > 0.5):
            box = box_from_mask(largest_component(m) if self.box_component == "largest" else m)
            if self.box_jitter:
                box = jitter_box(box, shape, rng=np.random.default_rng(sample_seed(seed, 0x6A17, i)),
                                 **self.box_jitter)
            boxes.append(box)
        return {
            "image": img_t.contiguous(),
            "masks": masks.contiguous(),
            "boxes": torch.as_tensor(np.stack(boxes), dtype=torch.float32),
            "object_ids": torch.as_tensor(drawn, dtype=torch.int64),
            "case_id": self.cases[case_index].case_id,
            "slice_index": -1 if slice_index is None else int(slice_index),
        }
