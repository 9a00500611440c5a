"""Expand cases (image + mask files) into 2D training samples: one per (image or slice, class present).

Mask conventions accepted (``normalize_mask``):

- binary masks stored as 0/255 or 0/1 (any integer dtype, or bool) -> class ``1``;
- integer label maps (0 = background, ``k > 0`` = class ``k``) -> one class per id present;
- a color mask whose three channels are equal is read as gray; anything else is a user error.

A 3D case (volume ``(D, H, W)``) is sliced along ``axis`` (default 0, i.e. ``D``): slice ``k`` of a class is
kept when it has at least ``min_foreground`` pixels of that class. A 2D case is kept under the same rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imedsam.data.folders import CaseRef
from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

__all__ = ["SampleRef", "normalize_mask", "take_slice", "expand_case", "class_mask"]


@dataclass(frozen=True)
class SampleRef:
    """One 2D training sample: a class of an image, or of one slice of a volume.

    Attributes:
        case_index: position of the case in the list the samples were built from.
        case_id: the case identifier.
        split: the case's split (or ``None``).
        class_id: the label id whose binary mask this sample uses (``1`` for binary masks).
        slice_index: index along the slicing axis for volumes, ``None`` for 2D images.
        n_foreground: number of pixels of ``class_id`` in the image/slice.
    """

    case_index: int
    case_id: str
    split: str | None
    class_id: int
    slice_index: int | None
    n_foreground: int


def normalize_mask(array: np.ndarray, *, source: str | Path = "mask", ndim: int | None = None) -> np.ndarray:
    """Turn a mask read from disk into an integer label map (0 = background).

    Args:
        array: (H, W), (H, W, 3|4) for 2D color masks, or (D, H, W) for volumes; bool, integer, or float with
            integer values.
        source: the file, named in error messages.
        ndim: expected spatial dimensionality (2 or 3), checked when given.

    Returns:
        int64 array of the spatial shape: 0/255 and 0/1 binary masks give {0, 1}; label maps keep their ids.
    """
    a = np.asarray(array)
    if ndim == 2 and a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ImedsamError(f"{source}: color mask with different channels; save masks as single-channel "
                               f"binary (0/255) or label-map images")
        a = rgb[..., 0]
    if ndim is not None and a.ndim != ndim:
        raise ImedsamError(f"{source}: mask has shape {a.shape}, expected a {ndim}D mask like its image")
    if a.dtype == bool:
        return a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ImedsamError(f"{source}: mask has non-integer values; save a binary (0/1, 0/255) or integer "
                               f"label-map mask (threshold probability maps first)")
    elif not np.issubdtype(a.dtype, np.integer):
        raise ImedsamError(f"{source}: unsupported mask dtype {a.dtype}; use an integer label map")
    labels = a.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ImedsamError(f"{source}: mask has negative values; labels must be 0 (background) or positive ids")
    values = np.unique(labels)
    if values.size and set(values.tolist()) <= {0, 255}:
        labels = (labels == 255).astype(np.int64)
    return labels


def take_slice(array: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
    """Slice ``index`` of a (D, H, W[, C]) array along spatial ``axis`` (0, 1 or 2); a view when possible."""
    return np.take(array, index, axis=axis)


def class_mask(labels: np.ndarray, class_id: int) -> np.ndarray:
    """Binary (bool) mask of one class of a label map."""
    return labels == class_id


def _counts(labels_2d_stack: np.ndarray, n_ids: int) -> np.ndarray:
    """(K, n_ids) pixel counts of every id in each of K flattened slices."""
    flat = labels_2d_stack.reshape(labels_2d_stack.shape[0], -1)
    offs = (np.arange(flat.shape[0], dtype=np.int64) * n_ids)[:, None]
    return np.bincount((flat + offs).ravel(), minlength=flat.shape[0] * n_ids).reshape(flat.shape[0], n_ids)


def expand_case(
    case_index: int,
    case: CaseRef,
    labels: np.ndarray,
    *,
    axis: int = 0,
    min_foreground: int = 1,
    classes: Sequence[int] | None = None,
) -> list[SampleRef]:
    """The samples of one case: one per (image or slice, class present with >= ``min_foreground`` pixels).

    Args:
        case_index: index of ``case`` in the caller's case list (stored in each ``SampleRef``).
        case: the case.
        labels: its label map from ``normalize_mask``: (H, W) or (D, H, W) non-negative integers.
        axis: slicing axis for volumes (0 = D of (D, H, W)).
        min_foreground: minimum number of pixels of a class for the image/slice to count (>= 1).
        classes: restrict to these label ids (default: every id > 0 present).

    Returns:
        ``SampleRef`` list ordered by slice, then class.
    """
    if min_foreground < 1:
        raise ImedsamError(f"min_foreground: must be >= 1 (a box prompt needs a non-empty mask), got {min_foreground}")
    if labels.ndim not in (2, 3):
        raise ImedsamError(f"{case.mask_path}: mask has shape {labels.shape}; expected (H, W) or (D, H, W)")
    if labels.ndim == 3 and axis not in (0, 1, 2):
        raise ImedsamError(f"axis: slicing axis must be 0, 1 or 2 for a (D, H, W) volume, got {axis}")
    n_ids = int(labels.max()) + 1 if labels.size else 1
    stack = labels[None] if labels.ndim == 2 else np.moveaxis(labels, axis, 0)
    counts = _counts(np.ascontiguousarray(stack), n_ids)
    wanted = range(1, n_ids) if classes is None else [int(c) for c in classes if 0 < int(c) < n_ids]
    out: list[SampleRef] = []
    for k in range(counts.shape[0]):
        for c in wanted:
            n = int(counts[k, c])
            if n >= min_foreground:
                out.append(SampleRef(case_index, case.case_id, case.split, int(c),
                                     None if labels.ndim == 2 else k, n))
    if not out:
        logger.debug("%s: no slice/class with >= %d foreground pixels", case.case_id, min_foreground)
    return out
