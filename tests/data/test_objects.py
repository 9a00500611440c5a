"""Several objects per image: the SAM-Med2D JSON layout, ObjectsDataset sampling, boxes of the largest component,
small-object filter, augmentation applied to every object alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imedsam.data import SegmentationDataset, discover
from imedsam.data.augment import AugmentConfig
from imedsam.data.objects import ObjectsDataset, largest_component
from imedsam.errors import ImedsamError
from tests.datapaths import shared_dataset


@pytest.fixture
def sammed2d_root(tmp_path):
    """Two training images (3 and 2 objects) and one test image, SAM-Med2D style, paths under 'data_demo/'."""
    root = tmp_path / "sm2d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    train, test = {}, {}
    specs = {"a": [("liver_000", (5, 25, 5, 30)), ("spleen_000", (30, 45, 35, 60)), ("aorta_000", (50, 56, 8, 14))],
             "b": [("liver_000", (10, 40, 10, 40)), ("spleen_000", (45, 60, 45, 62))],
             "c": [("liver_000", (20, 50, 20, 50))]}
    for stem, objects in specs.items():
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        names = []
        for name, (y0, y1, x0, x1) in objects:
            m = np.zeros((64, 64), np.uint8)
            m[y0:y1, x0:x1] = 255
            Image.fromarray(m).save(root / "masks" / f"{stem}_{name}.png")
            names.append(f"data_demo/masks/{stem}_{name}.png")
        if stem == "c":
            test.update({n: f"data_demo/images/{stem}.png" for n in names})
        else:
            train[f"data_demo/images/{stem}.png"] = names
    (root / "image2label_train.json").write_text(json.dumps(train))
    (root / "label2image_test.json").write_text(json.dumps(test))
    return root


def test_sammed2d_layout_one_case_per_image_objects_share_ids(sammed2d_root):
    index = discover(sammed2d_root)
    assert index.layout == "sammed2d" and index.counts() == {"train": 2, "test": 1}
    assert sorted(index.labels.values()) == ["aorta_000", "liver_000", "spleen_000"]
    liver = next(i for i, n in index.labels.items() if n == "liver_000")
    ds = SegmentationDataset(index, split="train")
    assert len(ds) == 5  # one item per object
    assert {item["class_id"] for item in (ds[i] for i in range(len(ds)))} == set(index.labels)
    a = ds[[i for i in range(len(ds)) if ds[i]["case_id"] == "a" and ds[i]["class_id"] == liver][0]]
    assert a["mask"][0, 5:25, 5:30].all() and a["mask"].sum() == 20 * 25


def test_overlapping_object_masks_are_refused(sammed2d_root):
    m = np.zeros((64, 64), np.uint8)
    m[20:30, 20:30] = 255
    Image.fromarray(m).save(sammed2d_root / "masks" / "b_spleen_000.png")  # overlaps b's liver
    with pytest.raises(ImedsamError, match="overlaps"):
        SegmentationDataset(discover(sammed2d_root), split="train")


def test_objects_dataset_draws_masks_with_replacement_and_boxes(sammed2d_root):
    ds = ObjectsDataset(discover(sammed2d_root), split="train", masks_per_image=5, seed=3)
    assert len(ds) == 2
    item = ds[0]
    assert item["masks"].shape == (5, 64, 64) and item["boxes"].shape == (5, 4)
    for m, box in zip(item["masks"].numpy() > 0.5, item["boxes"].numpy()):
        ys, xs = np.nonzero(m)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert len(set(item["object_ids"].tolist())) <= 3  # 5 draws from 3 objects: with replacement
    again = ObjectsDataset(discover(sammed2d_root), split="train", masks_per_image=5, seed=3)[0]
    assert np.array_equal(item["object_ids"], again["object_ids"])  # seeded
    names = discover(sammed2d_root).labels
    aorta = next(i for i, n in names.items() if n == "aorta_000")
    case_a = [ObjectsDataset(discover(sammed2d_root), split="train", masks_per_image=6, seed=i) for i in range(4)]
    assert any(aorta in d[0]["object_ids"].tolist() for d in case_a)  # the 6x6 aorta of image a is drawn...
    filtered = [ObjectsDataset(discover(sammed2d_root), split="train", masks_per_image=6, min_fraction=0.01,
                               seed=i)[0] for i in range(4)]
    assert not any(aorta in d["object_ids"].tolist() for d in filtered)  # ...but not under 1 % of the image
    assert all(36 not in {int(m.sum()) for m in d["masks"]} for d in filtered)


def test_box_of_the_largest_component_and_augmentation_moves_all_objects(sammed2d_root):
    m = np.zeros((20, 20), bool)
    m[2:5, 2:5] = True
    m[8:18, 6:16] = True
    assert largest_component(m).sum() == 100
    ds = ObjectsDataset(discover(sammed2d_root), split="train", masks_per_image=6, seed=1, size=(48, 48),
                        augment=AugmentConfig(intensity=False), box_component="largest")
    item = ds[1]
    assert item["image"].shape == (3, 48, 48) and item["masks"].shape == (6, 48, 48)
    masks = item["masks"].numpy() > 0.5
    ids = item["object_ids"].numpy()
    for k in set(ids.tolist()):  # the same object drawn twice is the same (one augmentation per image)
        same = masks[ids == k]
        assert all(np.array_equal(same[0], s) for s in same)
    distinct = [masks[ids == k][0] for k in set(ids.tolist())]
    assert not any((a & b).any() for i, a in enumerate(distinct) for b in distinct[i + 1:])  # objects stay apart


def test_components_become_objects(tmp_path):
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    m = np.zeros((32, 32), np.uint8)
    m[2:8, 2:8] = 255
    m[20:30, 18:30] = 255
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(m).save(root / "masks" / "x.png")
    classes = ObjectsDataset(discover(root), masks_per_image=3, objects="classes")[0]
    comps = ObjectsDataset(discover(root), masks_per_image=8, objects="components", seed=0)[0]
    assert {int(s.sum()) for s in classes["masks"]} == {36 + 120}
    assert {int(s.sum()) for s in comps["masks"]} == {36, 120}


def test_real_sammed2d_demo_layout():
    root = shared_dataset("sammed2d-demo")
    index = discover(root)
    assert index.layout == "sammed2d" and index.counts() == {"train": 2, "test": 2}
    assert len(SegmentationDataset(index, split="train")) == 19  # one item per mask file
    assert len(SegmentationDataset(index, split="test")) == 11
