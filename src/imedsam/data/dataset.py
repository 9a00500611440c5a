"""``SegmentationDataset``: 2D training samples (image or volume slice, one class) with their box prompt.

Each item is a dict:

- ``"image"``: float32 tensor ``(3, H, W)``, RGB on the display scale 0..255 (not normalised; the model's
  preprocessing subtracts SAM's mean/std). Gray images are replicated to 3 channels; volumes are mapped to
  0..255 with one window for the whole volume (``window`` argument, else the file's window, else the volume's
  0.5..99.5 percentiles), so all slices of a case share one intensity scale.
- ``"mask"``: float32 ``(1, H, W)`` in {0, 1}, the binary mask of ``class_id``.
- ``"box"``: float32 ``(4,)`` half-open xyxy box in pixels of the returned image (tight box of ``mask``, then
  jittered when ``box_jitter`` is set).
- ``"case_id"`` (str), ``"class_id"`` (int), ``"slice_index"`` (int; ``-1`` for 2D images, so batches collate),
  ``"original_size"``: int64 ``(2,)`` ``(H, W)`` of the image/slice before any resize;
  ``"spacing"``: float32 ``(2,)`` (row, column) pixel spacing in mm of the returned image, NaN when unknown.

Items are at the ORIGINAL size unless ``size=(S_h, S_w)`` is given (image bilinear, mask nearest), which makes
equal-size training batches; resizing to the encoder input otherwise happens in the model's preprocessing.
Randomness (augmentation, box jitter) is seeded per item from ``(seed, epoch, index)``; call ``set_epoch``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from imedsam.data.augment import AugmentConfig, Augmenter, sample_seed
from imedsam.data.folders import CaseRef, DatasetIndex, discover
from imedsam.data.prompts import box_from_mask, jitter_box
from imedsam.data.samples import SampleRef, class_mask, expand_case, normalize_mask, take_slice
from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

__all__ = ["SegmentationDataset", "read_case"]


def _read(path: Path):
    from imedsam.io import read

    return read(path)


def read_case(case: CaseRef, *, window=None, with_spacing: bool = False):
    """Decode one case: display image and label map on the same grid.

    Returns:
        ``image``: uint8 ``(H, W, 3)`` for 2D cases, uint8 ``(D, H, W)`` (windowed) for volumes;
        ``labels``: int64 ``(H, W)`` or ``(D, H, W)`` (see ``normalize_mask``);
        with ``with_spacing``, also the image's spacing per array axis in mm (``None`` when unknown).
    """
    from imedsam.io.images import to_display_rgb, to_display_volume

    if not case.has_mask:
        raise ImedsamError(f"{case.image_path}: case '{case.case_id}' has no mask; training and evaluation "
                           f"need one (add it, or discover with require_masks=True)")
    img = _read(Path(case.image_path))
    from imedsam.io.sample import require_finite

    require_finite(img.array, str(case.image_path))
    if case.object_masks:
        labels = _object_label_map(case, tuple(img.geometry.shape))
        image = to_display_rgb(img, window=window)
        return (image, labels, img.geometry.spacing) if with_spacing else (image, labels)
    msk = _read(Path(case.mask_path))
    labels = normalize_mask(msk.array, source=case.mask_path, ndim=img.geometry.ndim)
    if tuple(labels.shape) != tuple(img.geometry.shape):
        raise ImedsamError(f"{case.mask_path}: mask shape {labels.shape} differs from image shape "
                           f"{tuple(img.geometry.shape)} ({case.image_path}); masks must be on the image grid")
    image = to_display_volume(img, window=window) if img.is_volume else to_display_rgb(img, window=window)
    if with_spacing:
        return image, labels, img.geometry.spacing
    return image, labels


def _object_label_map(case: CaseRef, shape: tuple[int, ...]) -> np.ndarray:
    """The label map of a case given as one binary mask file per object (SAM-Med2D layout)."""
    labels = np.zeros(shape, dtype=np.int64)
    for object_id, path in case.object_masks or ():
        mask = normalize_mask(_read(Path(path)).array, source=path, ndim=len(shape)) > 0
        if mask.shape != shape:
            raise ImedsamError(f"{path}: mask shape {mask.shape} differs from image shape {shape} "
                               f"({case.image_path}); masks must be on the image grid")
        overlap = int((mask & (labels > 0)).sum())
        if overlap:
            raise ImedsamError(f"{path}: overlaps another object mask of {case.image_path} on {overlap} pixels; "
                               f"objects of one image must not overlap")
        labels[mask] = object_id
    return labels


class SegmentationDataset(Dataset):
    """2D samples of a dataset folder (see the module docstring for the item layout).

    Args:
        source: a ``DatasetIndex`` (from ``discover``), a list of ``CaseRef``, or a dataset folder.
        split: keep only the cases of this split (``"train"``, ``"val"``, ``"test"``) or ``None`` for all.
        axis: slicing axis of volumes (0 = D of (D, H, W)).
        min_foreground: a class of an image/slice becomes a sample when it has at least this many pixels.
        classes: restrict to these label ids (default: every id present).
        size: optional ``(S_h, S_w)`` output size (image bilinear, mask nearest; box from the resized mask).
        window: intensity window for volumes/16-bit images (``(center, width)`` or a CT window name).
        augment: ``True`` for ``AugmentConfig()``, an ``AugmentConfig``, an ``Augmenter``, or None (no augmentation).
        box_jitter: keyword arguments of ``jitter_box`` (e.g. ``{"mode": "expand", "expand": (0, 20)}``) or None
            for the tight box.
        seed: base seed of all randomness.
        cache_size: number of decoded cases kept in memory (per DataLoader worker).
    """

    def __init__(
        self,
        source: DatasetIndex | Sequence[CaseRef] | str | os.PathLike,
        *,
        split: str | None = None,
        axis: int = 0,
        min_foreground: int = 1,
        classes: Sequence[int] | None = None,
        size: tuple[int, int] | None = None,
        window=None,
        augment: bool | AugmentConfig | Augmenter | None = None,
        box_jitter: dict | None = None,
        seed: int = 0,
        cache_size: int = 8,
    ) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = discover(source)
        if isinstance(source, DatasetIndex):
            index = source.subset(split) if split is not None else source
            cases = list(index.cases)
            self.labels = index.labels
        else:
            cases = [c for c in source if split is None or c.split == split]
            self.labels = None
        if not cases:
            raise ImedsamError(f"source: no cases{'' if split is None else f' in split {split!r}'}; check the "
                               f"dataset folder and its splits")
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise ImedsamError(f"size: {size} must be positive (S_h, S_w)")
        self.cases: list[CaseRef] = cases
        self.axis, self.size, self.window = axis, size, window
        self.seed, self.epoch = int(seed), 0
        self.box_jitter = dict(box_jitter) if box_jitter else None
        if augment is True:
            augment = Augmenter()
        elif isinstance(augment, AugmentConfig):
            augment = Augmenter(augment)
        self.augmenter: Augmenter | None = augment or None
        self._cache: OrderedDict[int, tuple] = OrderedDict()  # (image, labels, spacing)
        self._cache_size = max(int(cache_size), 1)
        refs: list[SampleRef] = []
        for i, case in enumerate(cases):
            labels = self._load(i)[1]
            refs += expand_case(i, case, labels, axis=axis, min_foreground=min_foreground, classes=classes)
        if not refs:
            raise ImedsamError(f"min_foreground: no image/slice of the {len(cases)} case(s) has a class with >= "
                               f"{min_foreground} pixels; lower min_foreground or check the masks/classes")
        self.samples: list[SampleRef] = refs
        logger.info("SegmentationDataset: %d samples from %d cases", len(refs), len(cases))

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Change the per-item random streams (call once per epoch, before iterating)."""
        self.epoch = int(epoch)

    def _load(self, case_index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        if case_index in self._cache:
            self._cache.move_to_end(case_index)
            return self._cache[case_index]
        item = read_case(self.cases[case_index], window=self.window, with_spacing=True)
        self._cache[case_index] = item
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return item

    def item_seed(self, index: int) -> int:
        """The seed of item ``index`` in the current epoch."""
        return sample_seed(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.samples[index]
        image, labels, spacing = self._load(ref.case_index)
        if spacing is not None and ref.slice_index is not None:  # in-plane spacing of the slice
            spacing = tuple(v for axis, v in enumerate(spacing) if axis != self.axis)
        pixel_spacing = np.array(spacing if spacing is not None else (np.nan, np.nan), dtype=np.float32)
        if ref.slice_index is not None:
            image = take_slice(image, ref.slice_index, self.axis)
            labels = take_slice(labels, ref.slice_index, self.axis)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        mask = class_mask(labels, ref.class_id)
        h, w = mask.shape
        img_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        msk_t = torch.from_numpy(mask).float()[None]
        box = box_from_mask(mask)
        if self.size is not None and self.size != (h, w):
            img_t = F.interpolate(img_t[None], size=self.size, mode="bilinear", align_corners=False)[0]
            msk_t = F.interpolate(msk_t[None], size=self.size, mode="nearest-exact")[0]  # pixel centres
            sy, sx = self.size[0] / h, self.size[1] / w
            pixel_spacing = pixel_spacing / np.array([sy, sx], dtype=np.float32)
            if bool(msk_t.any()):
                box = box_from_mask(msk_t[0].numpy())
            else:  # the object vanished under nearest resize: keep its scaled (half-open) box, >= 1 px wide
                scaled = np.round(box * np.array([sx, sy, sx, sy]))
                scaled[2:] = np.maximum(scaled[2:], scaled[:2] + 1)
                box = np.clip(scaled, 0, [self.size[1], self.size[0]] * 2).astype(np.float32)
        seed = self.item_seed(index)
        if self.augmenter is not None:
            img_t, msk_t, done = self.augmenter(img_t, msk_t, seed=seed)
            if done:
                box = box_from_mask(msk_t[0].numpy())
        if self.box_jitter:
            rng = np.random.default_rng(sample_seed(seed, 0x6A17))
            box = jitter_box(box, tuple(msk_t.shape[1:]), rng=rng, **self.box_jitter)
        return {
            "image": img_t.contiguous(),
            "mask": msk_t.contiguous(),
            "box": torch.as_tensor(box, dtype=torch.float32),
            "case_id": ref.case_id,
            "class_id": ref.class_id,
            "slice_index": -1 if ref.slice_index is None else ref.slice_index,
            "original_size": torch.tensor([h, w], dtype=torch.int64),
            "spacing": torch.from_numpy(pixel_spacing),
        }
