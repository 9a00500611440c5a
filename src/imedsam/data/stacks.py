"""``StacksDataset``: stacks of D adjacent slices of 3-D volumes with their multi-class labels (MA-SAM training).

Each item is a dict:

- ``"image"``: float32 ``(D, 3, S, S)``, the stack's slices on the display scale 0..255 (one intensity mapping per
  volume, :func:`imedsam.io.images.to_display_volume`), gray replicated to RGB, resized to ``size`` (bilinear);
- ``"labels"``: int64 ``(D, S, S)``, the label ids of the same slices (nearest);
- ``"case_id"`` (str), ``"slice_index"`` (int, the centre slice), ``"axis"`` (str, the file axis across which);
- ``"box"`` (with ``box_prompt``): float32 ``(4,)``, the half-open xyxy box in the S x S item's pixels given to
  every slice of the stack: the in-plane extent of the volume's 3-D box (the tight box of all its labelled
  voxels, every class: one box per scan, as ``--box3d`` gives at inference), moved with the augmentation and
  expanded on each side by a uniform fraction of its size in ``box_expand``.

Slices are taken across the file's third axis ``k`` (the array's first), or, with ``axes`` (MA-SAM's
``model.stack_axes``), across each of the listed file axes (:mod:`imedsam.io.slicing`: ``j`` gives (k, i) slices,
``i`` gives (k, j) slices): every (volume, axis, slice) is an item, so each stack runs across one axis. Several axes
need (near-)isotropic voxels: a volume whose spacing differs by more than ``MAX_ANISOTROPY`` between its axes is
refused. A stack is centred on its slice;
at the volume's ends the edge slice is repeated. Sampling is foreground-biased: with probability
``foreground_prob`` the centre is redrawn among the volume's slices that hold a label (MA-SAM samples around the
foreground); with ``box_prompt`` every stack is centred inside the 3-D box's slice range (volumes without a
label give no item). Augmentation, when given, is ONE draw applied identically to every slice of the stack (geometric:
image bilinear, labels nearest). Randomness is seeded per item from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from imedsam.data.augment import AugmentConfig, Augmenter, sample_seed
from imedsam.data.prompts import box_from_mask, jitter_box
from imedsam.data.volume_prompts import volume_box
from imedsam.errors import ImedsamError
from imedsam.io.slicing import across, check_axes

__all__ = ["MAX_ANISOTROPY", "StacksDataset", "stack_indices"]

#: largest ratio of the largest to the smallest voxel spacing for stacks across several axes
MAX_ANISOTROPY = 1.25


def stack_indices(centre: int, depth: int, n_slices: int) -> np.ndarray:
    """The ``depth`` slice indices of a stack centred on ``centre`` (odd ``depth``), edges repeated."""
    half = depth // 2
    return np.clip(np.arange(centre - half, centre + half + 1), 0, n_slices - 1)


class StacksDataset(Dataset):
    """See the module docstring. ``index``: a :class:`imedsam.data.folders.DatasetIndex` of 3-D cases."""

    def __init__(self, index, *, split: str | None, depth: int, size: tuple[int, int],
                 augment: AugmentConfig | None = None, seed: int = 0, foreground_prob: float = 0.5,
                 window=None, cache_size: int = 64, box_prompt: bool = False,
                 box_expand: tuple[float, float] = (0.0, 0.1), axes: tuple[str, ...] = ("k",)) -> None:
        if depth < 1 or depth % 2 == 0:
            raise ImedsamError(f"stack depth {depth}: must be odd (a centre slice and as many on each side)")
        self.cases = [c for c in index if split is None or c.split == split]
        if not self.cases:
            raise ImedsamError(f"--data: no case in split {split!r} to train on")
        self.depth, self.size, self.seed = depth, tuple(size), seed
        self.foreground_prob, self.window = foreground_prob, window
        self.augmenter = Augmenter(augment) if augment is not None else None
        self.box_prompt, self.box_expand = box_prompt, (float(box_expand[0]), float(box_expand[1]))
        self.axes = check_axes(axes, argument="model.stack_axes")
        self.epoch = 0
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = OrderedDict()
        self._cache_size = cache_size
        self._boxes: dict[tuple[int, str], np.ndarray] = {}  # (case, axis) -> the 3-D box in-plane (display px)
        self.items: list[tuple[int, str, int]] = []
        for i, case in enumerate(self.cases):
            image, _, labelled = self._load(i)
            for axis in self.axes:
                n = across(image, axis).shape[0]
                if not box_prompt:
                    self.items.extend((i, axis, z) for z in range(n))
                elif labelled[axis].size:  # the 3-D box's slice range across this axis
                    first, last = int(labelled[axis][0]), int(labelled[axis][-1])
                    self.items.extend((i, axis, z) for z in range(first, last + 1))
        if not self.items:
            raise ImedsamError(f"--data: no labelled volume in split {split!r} to train a box-prompted model on")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(display uint8 (D, H, W), labels (D, H, W) in a small int type, per stacking axis the indices of its
        slices holding a label). Volumes stay cached (``cache_size`` of them): counting the slices at
        construction reads each once, and shuffled training then draws from memory."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        from imedsam.data.dataset import read_case

        image, labels, spacing = read_case(self.cases[i], window=self.window, with_spacing=True)
        if image.ndim != 3:
            raise ImedsamError(f"{self.cases[i].image_path}: a 2-D image; stacks of slices need 3-D volumes")
        if len(self.axes) > 1 and spacing is not None and max(spacing) > MAX_ANISOTROPY * min(spacing):
            raise ImedsamError(f"{self.cases[i].image_path}: spacing {tuple(round(float(v), 3) for v in spacing)} "
                               f"mm is anisotropic; stacks across several axes (model.stack_axes "
                               f"{list(self.axes)}) need near-isotropic voxels: resample the volumes or use "
                               "stack_axes: [k]")
        labelled = {}
        for axis in self.axes:
            moved = across(labels, axis)
            labelled[axis] = np.nonzero(moved.reshape(moved.shape[0], -1).any(axis=1))[0]
        small = np.uint8 if labels.max() < 256 else np.int32  # ids as read; int64 only per item
        self._cache[i] = (image, labels.astype(small), labelled)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return self._cache[i]

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, axis, centre = self.items[index]
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, index))
        image, labels, by_axis = self._load(case_index)
        image, labels, labelled = across(image, axis), across(labels, axis), by_axis[axis]
        if labelled.size and rng.random() < self.foreground_prob:
            centre = int(labelled[rng.integers(labelled.size)])  # inside the box's range too
        idx = stack_indices(centre, self.depth, image.shape[0])
        img = torch.from_numpy(image[idx].astype(np.float32))[:, None]  # (D, 1, H, W)
        lab = torch.from_numpy(labels[idx].astype(np.float32))[:, None]  # (D, 1, H, W)
        if img.shape[-2:] != self.size:
            img = F.interpolate(img, size=self.size, mode="bilinear", align_corners=False)
            lab = F.interpolate(lab, size=self.size, mode="nearest")
        img, lab = img[:, 0], lab[:, 0]  # (D, S, S)
        box = self._stack_box(image.shape, labels, (case_index, axis)) if self.box_prompt else None
        if self.augmenter is not None:  # one draw for the whole stack: slices as channels (and the box's plane)
            moved = lab if box is None else torch.cat([lab, _box_plane(box, self.size)[None]])
            img, moved = self.augmenter.apply(img, moved, seed=int(rng.integers(2**31)), labels=True)
            lab = moved[: self.depth]
            if box is not None and bool(moved[-1].any()):  # a box moved off the image keeps its place
                box = box_from_mask(moved[-1].numpy())
        item = {"image": img[:, None].expand(-1, 3, -1, -1).contiguous(), "labels": lab.round().long(),
                "case_id": self.cases[case_index].case_id, "slice_index": centre, "axis": axis}
        if box is not None:
            item["box"] = torch.from_numpy(jitter_box(box, self.size, rng=rng, expand=self.box_expand,
                                                      mode="expand", unit="fraction"))
        return item

    def _stack_box(self, shape: tuple[int, ...], labels: np.ndarray, key: tuple[int, str]) -> np.ndarray:
        """The volume's 3-D box in-plane (``labels``: the volume across the item's axis; ``key``: (case,
        axis)), in the S x S item's pixels (float32 (4,), half-open xyxy)."""
        if key not in self._boxes:
            b = volume_box(labels > 0)
            self._boxes[key] = np.array([b[0], b[1], b[3], b[4]], dtype=np.float64)
        b = self._boxes[key]
        sy, sx = self.size[0] / shape[1], self.size[1] / shape[2]
        return np.array([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], dtype=np.float32)


def _box_plane(box: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(S, S) float plane, 1 on the pixels the half-open box covers (partly), 0 elsewhere."""
    plane = torch.zeros(size)
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    plane[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)] = 1.0
    return plane
