"""Dataset discovery, splits, slicing and per-class samples (synthetic folders; one test on real data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from imedsam.data import (
    SegmentationDataset,
    assign_splits,
    discover,
    expand_case,
    normalize_mask,
    split_ids,
)
from imedsam.data.folders import file_stem
from imedsam.errors import ImedsamError
from tests.data.conftest import SHARED_DATA, make_label_volume, rect_mask, write_png

# ------------------------------------------------------------------------------------------- folder pairs


def test_pairs_discovery_and_splits(pairs_root: Path) -> None:
    index = discover(pairs_root)
    assert index.layout == "folders"
    assert index.case_ids == [f"case{i}" for i in range(5)]
    assert index.counts() == {"train": 3, "val": 1, "test": 1}
    assert [c.case_id for c in index.subset("train")] == ["case0", "case1", "case2"]
    case = index[0]
    assert case.image_path.name == "case0.png" and case.mask_path.name == "case0.png"
    assert case.mask_path.parent.name == "masks"


def test_splits_json_with_missing_stem_names_it(pairs_root: Path) -> None:
    (pairs_root / "splits.json").write_text(json.dumps({"train": ["case0", "ghost_7"], "test": ["case1"]}))
    with pytest.raises(ImedsamError, match="ghost_7"):
        discover(pairs_root)


def test_splits_json_case_in_two_splits(pairs_root: Path) -> None:
    (pairs_root / "splits.json").write_text(json.dumps({"train": ["case0"], "val": ["case0"]}))
    with pytest.raises(ImedsamError, match="case0"):
        discover(pairs_root)


def test_seeded_split_without_splits_json(pairs_root: Path) -> None:
    (pairs_root / "splits.json").unlink()
    index = discover(pairs_root)
    assert not index.has_splits and index.counts() == {None: 5}
    with pytest.raises(ImedsamError, match="assign_splits"):
        index.subset("train")
    a = assign_splits(index, (0.6, 0.2, 0.2), seed=3)
    b = assign_splits(index, (0.6, 0.2, 0.2), seed=3)
    assert a.counts() == {"train": 3, "val": 1, "test": 1}
    assert [c.split for c in a] == [c.split for c in b]


def test_split_ids_sizes_and_reproducibility() -> None:
    ids = [f"id{i:03d}" for i in range(196)]
    s = split_ids(ids, (0.6, 0.2, 0.2), seed=2023)
    assert [len(s[k]) for k in ("train", "val", "test")] == [118, 39, 39]
    assert sorted(s["train"] + s["val"] + s["test"]) == ids
    assert s == split_ids(list(reversed(ids)), (0.6, 0.2, 0.2), seed=2023)  # order of input does not matter
    assert s != split_ids(ids, (0.6, 0.2, 0.2), seed=2024)
    with pytest.raises(ImedsamError, match="fractions"):
        split_ids(ids, (0.5, 0.2, 0.2), seed=0)


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(ImedsamError, match="not found"):
        discover(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImedsamError, match="empty"):
        discover(empty)
    odd = tmp_path / "odd"
    (odd / "pictures").mkdir(parents=True)
    with pytest.raises(ImedsamError, match=r"unknown dataset layout.*images/.*imagesTr"):
        discover(odd)
    noimg = tmp_path / "noimg"
    (noimg / "images").mkdir(parents=True)
    (noimg / "masks").mkdir()
    (noimg / "images" / "readme.txt").write_text("x")
    with pytest.raises(ImedsamError, match="no image files"):
        discover(noimg)
    nomask = tmp_path / "nomask"
    write_png(nomask / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(nomask / "images" / "b.png", np.zeros((4, 4), np.uint8))
    write_png(nomask / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImedsamError, match=r"no mask for 1 image.*b\.png"):
        discover(nomask)
    assert discover(nomask, require_masks=False)[1].mask_path is None


def test_file_stem_double_suffix() -> None:
    assert file_stem("x/la_000_0000.nii.gz") == "la_000_0000"
    assert file_stem("a.b.png") == "a.b"


# ------------------------------------------------------------------------------------------- nnU-Net


def test_nnunet_2d(nnunet2d_root: Path) -> None:
    index = discover(nnunet2d_root)
    assert index.layout == "nnunet"
    assert index.labels == {1: "a", 2: "b"}
    # imagesTs has no labelsTs: skipped unless masks are optional
    assert index.counts() == {"train": 3}
    assert index[0].case_id == "img_000" and index[0].image_path.name == "img_000_0000.png"
    loose = discover(nnunet2d_root, require_masks=False)
    assert loose.counts() == {"train": 3, "test": 1}
    ds = SegmentationDataset(index)
    # one sample per (image, class present): 3 x class 1 + 1 x class 2
    assert [(s.case_id, s.class_id) for s in ds.samples] == [
        ("img_000", 1), ("img_001", 1), ("img_001", 2), ("img_002", 1)]
    item = ds[2]
    assert item["class_id"] == 2 and item["slice_index"] == -1
    assert item["box"].tolist() == [20.0, 10.0, 28.0, 15.0]
    assert torch.equal(item["image"][0], torch.full((20, 30), 40.0))
    assert item["mask"].sum().item() == 40  # class 2 only, binary


def test_nnunet_missing_label_and_channel_suffix(nnunet2d_root: Path) -> None:
    (nnunet2d_root / "labelsTr" / "img_002.png").unlink()
    with pytest.raises(ImedsamError, match="img_002_0000.png"):
        discover(nnunet2d_root)
    write_png(nnunet2d_root / "labelsTr" / "img_002.png", np.zeros((20, 30), np.uint8))
    write_png(nnunet2d_root / "imagesTr" / "noch.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(ImedsamError, match="_0000"):
        discover(nnunet2d_root)


def test_nnunet_3d_slicing_and_classes(nnunet3d_root: Path) -> None:
    index = discover(nnunet3d_root)
    assert index.counts() == {"train": 2, "test": 1}
    assert index.labels == {1: "liver", 2: "spleen"}
    train = index.subset("train")
    ds = SegmentationDataset(train, min_foreground=10)
    # class 1: slices 2 (12 px), 3 (20 px); class 2: slice 2 (15 px); per case, ordered by slice then class
    assert [(s.case_id, s.slice_index, s.class_id, s.n_foreground) for s in ds.samples] == [
        ("synth_000", 2, 1, 12), ("synth_000", 2, 2, 15), ("synth_000", 3, 1, 20),
        ("synth_001", 2, 1, 12), ("synth_001", 2, 2, 15), ("synth_001", 3, 1, 20)]
    lab = make_label_volume()
    item = ds[1]
    assert item["image"].shape == (3, 16, 20) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 20)
    assert torch.equal(item["mask"][0], torch.from_numpy((lab[2] == 2).astype(np.float32)))
    assert item["box"].tolist() == [12.0, 10.0, 17.0, 13.0]
    assert (item["case_id"], item["class_id"], item["slice_index"]) == ("synth_000", 2, 2)
    assert item["original_size"].tolist() == [16, 20]
    assert 0 <= item["image"].min() and item["image"].max() <= 255
    # foreground is brighter in the windowed display image (+300 on the label)
    assert item["image"][0][item["mask"][0] > 0].mean() > item["image"][0][item["mask"][0] == 0].mean()
    # every slice with any pixel of a class when min_foreground=1, class filter
    ds1 = SegmentationDataset(train, classes=[2])
    assert [(s.slice_index, s.class_id) for s in ds1.samples[:2]] == [(2, 2), (4, 2)]
    # another slicing axis: axis 2 (W) of (D, H, W) gives (D, H) slices
    ds_w = SegmentationDataset(train, axis=2, min_foreground=5, classes=[1])
    first = ds_w[0]
    assert first["image"].shape == (3, 6, 16)
    assert first["mask"].sum().item() >= 5


def test_dataset_resize_and_collate(nnunet3d_root: Path) -> None:
    ds = SegmentationDataset(discover(nnunet3d_root), split="train", min_foreground=10, size=(32, 40))
    item = ds[2]  # class 1, slice 3: rows 6..9, cols 8..12 at (16, 20) -> doubled at (32, 40), half-open box
    assert item["image"].shape == (3, 32, 40) and item["mask"].shape == (1, 32, 40)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["box"].tolist() == [16.0, 12.0, 26.0, 20.0]
    assert item["original_size"].tolist() == [16, 20]
    batch = next(iter(DataLoader(ds, batch_size=3, shuffle=False)))
    assert batch["image"].shape == (3, 3, 32, 40) and batch["box"].shape == (3, 4)
    assert batch["case_id"] == ["synth_000"] * 3


def test_mask_conventions_and_shape_mismatch(tmp_path: Path) -> None:
    assert normalize_mask(np.array([[0, 255]], np.uint8)).tolist() == [[0, 1]]
    assert normalize_mask(np.array([[0, 1, 3]], np.uint16)).tolist() == [[0, 1, 3]]
    assert normalize_mask(np.array([[0.0, 2.0]])).tolist() == [[0, 2]]
    with pytest.raises(ImedsamError, match="non-integer"):
        normalize_mask(np.array([[0.0, 0.4]]))
    rgb = np.stack([rect_mask((4, 4), 0, 2, 0, 2)] * 3, axis=-1)
    assert normalize_mask(rgb, ndim=2).sum() == 4
    rgb[0, 0, 1] = 7
    with pytest.raises(ImedsamError, match="color mask"):
        normalize_mask(rgb, ndim=2, source="m.png")
    root = tmp_path / "mismatch"
    write_png(root / "images" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(root / "masks" / "a.png", rect_mask((8, 9), 1, 3, 1, 3))
    with pytest.raises(ImedsamError, match="differs from image shape"):
        SegmentationDataset(root)


def test_pairs_label_map_gives_one_sample_per_class(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    lab = np.zeros((10, 12), np.uint8)
    lab[1:3, 1:4] = 3
    lab[6:9, 5:11] = 7
    write_png(root / "images" / "x.png", np.zeros((10, 12, 3), np.uint8))
    write_png(root / "masks" / "x.png", lab)
    ds = SegmentationDataset(root)
    assert [s.class_id for s in ds.samples] == [3, 7]
    assert ds[0]["box"].tolist() == [1.0, 1.0, 4.0, 3.0]
    assert ds[1]["box"].tolist() == [5.0, 6.0, 11.0, 9.0]
    with pytest.raises(ImedsamError, match="min_foreground"):
        SegmentationDataset(root, min_foreground=100)


def test_expand_case_rejects_zero_min_foreground(pairs_root: Path) -> None:
    case = discover(pairs_root)[0]
    with pytest.raises(ImedsamError, match="min_foreground"):
        expand_case(0, case, np.zeros((4, 4), np.int64), min_foreground=0)


# ------------------------------------------------------------------------------------------- real data


def test_real_kvasir_sessile_split() -> None:
    root = SHARED_DATA / "kvasir-sessile"
    if not root.is_dir():
        pytest.skip(f"real data not available: {root} is absent (shared data folder of the project)")
    index = discover(root)
    assert index.layout == "folders" and len(index) == 196
    assert index.counts() == {"train": 118, "val": 39, "test": 39}
    ds = SegmentationDataset(index.subset("test").cases[:2])
    item = ds[0]
    assert item["image"].shape == (3, 256, 256) and item["class_id"] == 1
    m = item["mask"][0].numpy() > 0
    ys, xs = np.nonzero(m)
    assert item["box"].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # half-open


def test_items_carry_in_plane_spacing_scaled_by_resize(nnunet3d_root, pairs_root):
    import math

    from imedsam.data.cases import dataset_cases

    ds = SegmentationDataset(discover(nnunet3d_root))
    item = ds[0]
    assert item["slice_index"] >= 0
    assert item["spacing"].tolist() == pytest.approx([0.8, 0.7])  # (D, H, W) spacing (3.0, 0.8, 0.7), axis 0
    h, w = item["mask"].shape[1:]
    resized = SegmentationDataset(discover(nnunet3d_root), size=(2 * h, w))[0]
    assert resized["spacing"].tolist() == pytest.approx([0.4, 0.7])
    along_width = SegmentationDataset(discover(nnunet3d_root), axis=2)[0]
    assert along_width["spacing"].tolist() == pytest.approx([3.0, 0.8])
    assert dataset_cases(ds, limit=1)[0].spacing == pytest.approx((0.8, 0.7))
    png = SegmentationDataset(discover(pairs_root))[0]
    assert all(math.isnan(v) for v in png["spacing"].tolist())
    assert dataset_cases(SegmentationDataset(discover(pairs_root)), limit=1)[0].spacing is None


def test_dataset_keeps_a_box_for_an_object_lost_in_resizing(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    lab = np.zeros((16, 20), np.uint8)
    lab[2, 4] = 1  # nearest-exact halving keeps odd rows/cols only: this pixel vanishes
    write_png(root / "images" / "x.png", np.zeros((16, 20, 3), np.uint8))
    write_png(root / "masks" / "x.png", lab)
    item = SegmentationDataset(root, min_foreground=1, size=(8, 10))[0]
    assert item["mask"].sum().item() == 0
    # the original half-open box [4, 2, 5, 3] scaled by 1/2 and rounded, kept at least one pixel wide and tall
    assert item["box"].tolist() == [2.0, 1.0, 3.0, 2.0]
