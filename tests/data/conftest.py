"""Tiny synthetic datasets for the data tests (written into tmp_path; a few kB each)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_nifti(path: Path, array_dhw: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    """Write a (D, H, W) array so that ``imedsam.io.read_volume`` returns it unchanged (NIfTI order (x, y, z))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_dhw.transpose(2, 1, 0)), affine), str(path))


def rect_mask(shape, y0, y1, x0, x1, value=255) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = value
    return m


@pytest.fixture
def pairs_root(tmp_path: Path) -> Path:
    """``images/`` + ``masks/`` with 5 cases (RGB and gray, 0/255 and 0/1 masks) and a splits.json."""
    root = tmp_path / "pairs"
    rng = np.random.default_rng(0)
    for i in range(5):
        stem = f"case{i}"
        if i % 2:
            img = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        else:
            img = rng.integers(0, 255, (24, 32), dtype=np.uint8)
        write_png(root / "images" / f"{stem}.png", img)
        value = 255 if i != 3 else 1
        write_png(root / "masks" / f"{stem}.png", rect_mask((24, 32), 4 + i, 10 + i, 6, 20 + i, value))
    (root / "splits.json").write_text(json.dumps(
        {"seed": 1, "train": ["case0", "case1", "case2"], "val": ["case3"], "test": ["case4"]}))
    return root


#: Labels of the synthetic volume (D=6, H=16, W=20): class 1 has 4/12/20 px in slices 1/2/3, class 2 has
#: 15 px in slice 2 and 6 px in slice 4.
def make_label_volume() -> np.ndarray:
    lab = np.zeros((6, 16, 20), np.uint8)
    lab[1, 2:4, 3:5] = 1            # 4 px
    lab[2, 2:5, 3:7] = 1            # 12 px
    lab[3, 6:10, 8:13] = 1          # 20 px
    lab[2, 10:13, 12:17] = 2        # 15 px
    lab[4, 1:3, 15:18] = 2          # 6 px
    return lab


def write_stacks_dataset(root: Path, prefix: str = "t", cases: int = 3) -> Path:
    """``cases`` labelled MR volumes (:func:`make_label_volume`: 6 slices, classes 1 and 2) in the nnU-Net layout
    under ``root``, for MA-SAM's stacks of adjacent slices. Returns ``root``."""
    lab = make_label_volume()
    rng = np.random.default_rng(0)
    for i in range(cases):
        write_nifti(root / "imagesTr" / f"{prefix}_{i:03d}_0000.nii.gz",
                    (lab * 120 + rng.normal(20, 5, lab.shape)).astype("float32"))
        write_nifti(root / "labelsTr" / f"{prefix}_{i:03d}.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                   "channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture
def nnunet3d_root(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset001_Synth3D"
    lab = make_label_volume()
    rng = np.random.default_rng(1)
    for cid in ("synth_000", "synth_001"):
        vol = rng.normal(0, 100, lab.shape).astype(np.float32) + 300.0 * lab
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", vol, spacing=(3.0, 0.8, 0.7))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab, spacing=(3.0, 0.8, 0.7))
    write_nifti(root / "imagesTs" / "synth_100_0000.nii.gz", rng.normal(0, 1, lab.shape).astype(np.float32))
    write_nifti(root / "labelsTs" / "synth_100.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture
def nnunet2d_root(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset002_Synth2D"
    for i in range(3):
        img = np.full((20, 30), 40 * i, np.uint8)
        lab = np.zeros((20, 30), np.uint8)
        lab[2:6, 3:9] = 1
        if i == 1:
            lab[10:15, 20:28] = 2
        write_png(root / "imagesTr" / f"img_{i:03d}_0000.png", img)
        write_png(root / "labelsTr" / f"img_{i:03d}.png", lab)
    write_png(root / "imagesTs" / "img_100_0000.png", np.zeros((20, 30), np.uint8))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    return root
