"""Intensity defaults from an nnU-Net ``dataset.json``, as nnU-Net picks its normalisation: a channel named CT
gets the CT window (soft tissue, 40 / 400 HU), anything else the volume's 0.5-99.5 percentiles; the same mapping
in training, evaluation and `imedsam segment` of the dataset's file; a lone copy of the file is mapped by its own
information. Also: the mapping runs a block of slices at a time and integer percentiles come from a histogram,
both equal to the whole-volume computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imedsam import io
from imedsam.io import images
from imedsam.io.nnunet import declared_channel, is_ct_channel
from imedsam.io.sample import Geometry, Sample
from imedsam.io.windowing import apply_window
from tests.data.conftest import make_label_volume, write_nifti, write_png


def _dataset(root: Path, channel_names: dict | None, *, key: str = "channel_names") -> Path:
    """A tiny nnU-Net raw dataset: one int16 'CT-like' volume (HU: air, water, a bright organ) + labels."""
    lab = make_label_volume()
    vol = np.where(lab > 0, 300, -900).astype(np.int16)
    vol[:, :, :4] = 40
    write_nifti(root / "imagesTr" / "c_000_0000.nii.gz", vol)
    write_nifti(root / "labelsTr" / "c_000.nii.gz", lab)
    info = {"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}
    if channel_names is not None:
        info[key] = channel_names
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _percentile_map(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return apply_window(arr, (lo + hi) / 2, hi - lo)


def test_declared_channel_names(tmp_path):
    ct = _dataset(tmp_path / "ct", {"0": "CT"})
    v1 = _dataset(tmp_path / "v1", {"0": "ct"}, key="modality")  # nnU-Net v1 spelling
    mr = _dataset(tmp_path / "mr", {"0": "LGE-MRI"})
    bare = _dataset(tmp_path / "bare", None)
    assert declared_channel(ct / "imagesTr" / "c_000_0000.nii.gz") == "CT"
    assert declared_channel(v1 / "imagesTr" / "c_000_0000.nii.gz") == "ct"
    assert declared_channel(mr / "imagesTr" / "c_000_0000.nii.gz") == "LGE-MRI"
    assert declared_channel(bare / "imagesTr" / "c_000_0000.nii.gz") is None
    assert declared_channel(ct / "labelsTr" / "c_000.nii.gz") is None  # labels are not images
    assert declared_channel(ct / "imagesTr" / "c_000_0001.nii.gz") is None  # channel 1 is not declared
    assert is_ct_channel("CT") and is_ct_channel(" ct ") and not is_ct_channel("CTA") and not is_ct_channel(None)
    (bare / "dataset.json").write_text("{not json")
    assert declared_channel(bare / "imagesTr" / "c_000_0000.nii.gz") is None  # unreadable: nothing declared


def test_ct_dataset_gets_the_ct_window_mr_the_percentiles(tmp_path):
    ct = _dataset(tmp_path / "ct", {"0": "CT"})
    mr = _dataset(tmp_path / "mr", {"0": "MRI"})
    a = io.read(ct / "imagesTr" / "c_000_0000.nii.gz")
    b = io.read(mr / "imagesTr" / "c_000_0000.nii.gz")
    assert a.meta["channel_name"] == "CT" and b.meta["channel_name"] == "MRI"
    assert np.array_equal(io.to_display_volume(a), apply_window(a.array, 40, 400))  # soft tissue
    assert np.array_equal(io.to_display_volume(b), _percentile_map(b.array))
    assert not np.array_equal(io.to_display_volume(a), io.to_display_volume(b))
    assert images.display_window(a) == ("soft_tissue", "dataset.json: CT")
    assert images.intensity_rule(a) == "window soft_tissue (center 40, width 400) from dataset.json: CT"
    assert images.intensity_rule(b).startswith("percentiles 0.5-99.5")
    # an explicit window wins over the dataset's default
    assert np.array_equal(io.to_display_volume(a, window=(0, 2000)), apply_window(a.array, 0, 2000))
    # uint8 data is kept as is, whatever the dataset says
    u8 = Sample(array=np.full((2, 3, 3), 7, np.uint8), geometry=Geometry(shape=(2, 3, 3)),
                meta={"channel_name": "CT"})
    assert np.array_equal(io.to_display_volume(u8), u8.array)
    # 2-D: a 16-bit slice of a CT dataset is windowed too; a uint8 PNG is not
    assert np.array_equal(io.to_display_rgb(Sample(array=a.array[2], geometry=Geometry(shape=(16, 20)),
                                                   meta={"channel_name": "CT"}))[..., 0],
                          apply_window(a.array[2], 40, 400))


def test_training_evaluation_and_segment_map_a_ct_file_alike(tmp_path, monkeypatch):
    """read_case (training items, validation, evaluation) and `imedsam segment` of the dataset's file give the
    CT window; a copy of the file outside the dataset is a lone file: its own percentiles."""
    from imedsam.cli import main
    from imedsam.data import discover
    from imedsam.data.dataset import read_case
    from imedsam.data.stacks import StacksDataset

    root = _dataset(tmp_path / "Dataset009_CT", {"0": "CT"})
    path = root / "imagesTr" / "c_000_0000.nii.gz"
    raw = io.read(path).array
    want = apply_window(raw, 40, 400)
    case = discover(root).cases[0]
    assert np.array_equal(read_case(case)[0], want)
    stacks = StacksDataset(discover(root), split="train", depth=3, size=(16, 20), foreground_prob=0.0)
    assert np.array_equal(stacks[2]["image"][1, 0].numpy(), want[2].astype(np.float32))  # no resize: exact

    seen = []
    original = io.to_display_volume
    monkeypatch.setattr(io, "to_display_volume", lambda s, **kw: seen.append(original(s, **kw)) or seen[-1])
    argv = ["--box3d", "2", "2", "1", "12", "12", "4", "--model", "tiny_vit_test", "--device", "cpu"]
    assert main(["segment", str(path), *argv, "--out", str(tmp_path / "a.nii.gz")]) == 0
    lone = tmp_path / "lone" / "c_000_0000.nii.gz"
    lone.parent.mkdir()
    shutil.copy(path, lone)
    assert main(["segment", str(lone), *argv, "--out", str(tmp_path / "b.nii.gz")]) == 0
    assert np.array_equal(seen[0], want)  # in its dataset: the training mapping
    assert np.array_equal(seen[1], _percentile_map(raw))  # alone: the file's own percentiles


def test_2d_nnunet_png_dataset_keeps_uint8(tmp_path):
    root = tmp_path / "Dataset010_P"
    write_png(root / "imagesTr" / "p_000_0000.png", np.full((8, 8), 90, np.uint8))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    sample = io.read(root / "imagesTr" / "p_000_0000.png")
    assert sample.meta["channel_name"] == "CT"
    assert np.array_equal(io.to_display_rgb(sample)[..., 0], sample.array)


@pytest.mark.parametrize("dtype, low, high", [(np.int16, -1024, 3000), (np.uint16, 0, 4000), (np.int8, -100, 100),
                                              (np.int16, 5, 6)])
def test_integer_percentiles_from_a_histogram_equal_numpy(dtype, low, high):
    rng = np.random.default_rng(int(high))
    for shape in [(1,), (7,), (3, 5, 11), (2, 33, 17)]:
        arr = rng.integers(low, high, shape).astype(dtype)
        got = images._exact_int_percentiles(arr, (0.5, 99.5, 50.0))
        assert np.allclose(got, np.percentile(arr, [0.5, 99.5, 50.0]), rtol=0, atol=1e-9), (dtype, shape)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_blockwise_mapping_equals_the_whole_volume_at_once(dtype, monkeypatch):
    rng = np.random.default_rng(3)
    arr = rng.normal(100, 300, (9, 13, 7)).astype(dtype)
    sample = Sample(array=arr, geometry=Geometry(shape=arr.shape), meta={})
    lo, hi = np.percentile(arr, [0.5, 99.5])
    whole = apply_window(arr, (lo + hi) / 2, hi - lo)
    monkeypatch.setattr(images, "_CHUNK_VOXELS", 2 * 13 * 7 + 5)  # 2 slices per block, the last block short
    assert np.array_equal(io.to_display_volume(sample), whole)
    if dtype == np.float32:
        arr[0, 0, 0] = np.nan  # non-finite values are left out of the percentiles and become 0
        lo, hi = np.percentile(arr[np.isfinite(arr)], [0.5, 99.5])
        assert np.array_equal(io.to_display_volume(sample), apply_window(arr, (lo + hi) / 2, hi - lo))
    assert not io.to_display_volume(Sample(array=np.full((2, 2, 2), 5, dtype), geometry=Geometry(shape=(2, 2, 2)),
                                           meta={})).any()  # constant: 0
