"""Datasets, splits, prompt simulation and augmentation.

- ``discover(root) -> DatasetIndex``: image/mask folder pairs or the nnU-Net raw layout (``folders``);
- ``split_ids`` / ``assign_splits``: seeded train/val/test splits;
- ``SegmentationDataset``: 2D samples (image or volume slice x class) with their box (``dataset``);
- ``box_from_mask``, ``jitter_box``, ``sample_points``, ``clicks_from_error`` (``prompts``);
- ``Augmenter``/``AugmentConfig``: seeded MONAI augmentation of image and mask together (``augment``).

Prompt conventions: points ``(x, y)`` and boxes ``[x_min, y_min, x_max, y_max]`` in pixel coordinates of the
original image; click labels 1 = foreground, 0 = background.
"""

from imedsam.data.augment import AugmentConfig, Augmenter, augment_item, sample_seed
from imedsam.data.dataset import SegmentationDataset, read_case
from imedsam.data.folders import CaseRef, DatasetIndex, assign_splits, discover, split_ids
from imedsam.data.prompts import box_from_mask, clicks_from_error, jitter_box, sample_points, validate_box
from imedsam.data.samples import SampleRef, expand_case, normalize_mask

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "CaseRef",
    "DatasetIndex",
    "SampleRef",
    "SegmentationDataset",
    "assign_splits",
    "augment_item",
    "box_from_mask",
    "clicks_from_error",
    "discover",
    "expand_case",
    "jitter_box",
    "normalize_mask",
    "read_case",
    "sample_points",
    "sample_seed",
    "split_ids",
    "validate_box",
]
