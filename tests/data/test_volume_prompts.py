"""Volumes, slice by slice: prompt mapping from (i, j, k) voxel indices, propagation, and `imedsam segment` on
NIfTI and DICOM series (labels written on the input's grid, geometry identical when read back)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from imedsam.cli import main
from imedsam.errors import ImedsamError
from imedsam.data.volume_prompts import (
    SliceFrame,
    VolumePrompt,
    check_volume_prompt,
    mask_box,
    plan_slices,
    propagate,
    segment_volume,
    slice_box,
    slice_points,
)


def _ball(shape_dhw=(16, 48, 56), centre=(8, 22, 30), radius=(5, 10, 12)) -> np.ndarray:
    d, h, w = np.meshgrid(*[np.arange(n) for n in shape_dhw], indexing="ij")
    return (((d - centre[0]) / radius[0]) ** 2 + ((h - centre[1]) / radius[1]) ** 2
            + ((w - centre[2]) / radius[2]) ** 2) <= 1


def test_slice_frames_map_ijk_prompts_to_slice_xy() -> None:
    box3d = (10, 20, 3, 30, 40, 7)  # i0 j0 k0 i1 j1 k1
    prompt = VolumePrompt(box3d=box3d, points=np.array([[12, 25, 5, 1], [1, 2, 0, 0]], float))
    k, j, i = SliceFrame("k"), SliceFrame("j"), SliceFrame("i")
    assert slice_box(prompt, k) == [10, 20, 30, 40]  # x = i, y = j
    assert slice_box(prompt, j) == [10, 3, 30, 7]  # x = i, y = k
    assert slice_box(prompt, i) == [20, 3, 40, 7]  # x = j, y = k
    pts = slice_points(prompt, k)
    assert sorted(pts) == [0, 5]
    np.testing.assert_array_equal(pts[5][0], [[12.5, 25.5]])  # voxel centres
    np.testing.assert_array_equal(pts[5][1], [1])
    assert plan_slices(prompt, k, 10) == [0, 3, 4, 5, 6]  # the box's k range and the slice of each point
    # the 2D slice taken across each axis has rows = y and columns = x
    vol = np.zeros((8, 50, 40))  # (k, j, i)
    vol[5, 25, 12] = 1
    assert k.take(vol, 5)[25, 12] == 1 and j.take(vol, 25)[5, 12] == 1 and i.take(vol, 12)[5, 25] == 1


def test_volume_prompts_are_checked_in_one_line() -> None:
    shape = (10, 40, 50)  # (k, j, i): the volume is 50 x 40 x 10 (I x J x K)
    cases = [
        (VolumePrompt(box3d=(0, 0, 5, 10, 10, 5)), "degenerate box"),
        (VolumePrompt(box3d=(60, 0, 0, 70, 10, 5)), "outside the 50x40x10"),
        (VolumePrompt(points=np.array([[5, 5, 10, 1]], float)), "outside the 50x40x10"),
        (VolumePrompt(points=np.array([[5, 5, 1, 2]], float)), "LABEL"),
        (VolumePrompt(points=np.array([[5, 5, 1, 0]], float), propagate=True), "--propagate"),
        (VolumePrompt(), "no prompt"),
    ]
    for prompt, message in cases:
        with pytest.raises(ImedsamError, match=message):
            check_volume_prompt(prompt, shape)
    check_volume_prompt(VolumePrompt(box3d=(0, 0, 0, 50, 40, 10)), shape)


def test_propagation_follows_the_mask_and_stops_on_an_empty_slice() -> None:
    gt = np.zeros((14, 20, 20), bool)
    gt[3:7, 5:12, 6:14] = True  # one object on slices 3..6
    gt[9:12, 5:12, 6:14] = True  # another beyond an empty gap: must never be reached
    calls: list[tuple[int, list[float] | None]] = []

    def predict(s, box, points, labels):
        calls.append((s, box))
        return gt[s].copy()

    masks = propagate(predict, 4, gt[4], 0, 14)
    assert sorted(masks) == [2, 3, 4, 5, 6, 7]  # to the first empty slice on each side, kept empty
    assert not masks[2].any() and not masks[7].any()
    assert [s for s, _ in calls] == [5, 6, 7, 3, 2]
    assert calls[0][1] == mask_box(gt[4]) == [6.0, 5.0, 14.0, 12.0]  # each slice prompted with its neighbour's box
    # a box range bounds it too
    calls.clear()
    assert sorted(propagate(predict, 4, gt[4], 4, 6)) == [4, 5]


def test_segment_volume_box_range_and_propagation_from_the_middle() -> None:
    gt = _ball()
    seen: list[int] = []

    def predict(s, box, points, labels):
        seen.append(s)
        return gt[s] if box is not None or points is not None else np.zeros_like(gt[s])

    frame = SliceFrame("k")
    box3d = (0, 0, 5, 56, 48, 10)  # slices 5..9 only
    out = segment_volume(predict, gt.shape, VolumePrompt(box3d=box3d), frame)
    assert seen == [5, 6, 7, 8, 9]
    np.testing.assert_array_equal(out[5:10], gt[5:10])
    assert not out[:5].any() and not out[10:].any()
    seen.clear()
    out = segment_volume(predict, gt.shape, VolumePrompt(box3d=(0, 0, 0, 56, 48, 16), propagate=True), frame)
    assert seen[0] == 7  # the middle slice of [0, 16)
    np.testing.assert_array_equal(out, gt)  # followed through the whole ball, both ways
    assert len(seen) == int(gt.any(axis=(1, 2)).sum()) + 2  # each ball slice, then one empty slice on each side


@pytest.fixture
def ball_nifti(tmp_path):
    """A bright ellipsoid in noise, (i, j, k) = (56, 48, 16), oblique affine with anisotropic spacing."""
    gt = _ball()  # (k, j, i)
    rng = np.random.default_rng(0)
    image = (rng.normal(100, 10, gt.shape) + 300 * gt).astype(np.float32)
    a = np.deg2rad(20)
    affine = np.array([[0.8 * np.cos(a), -0.7 * np.sin(a), 0, -40.0], [0.8 * np.sin(a), 0.7 * np.cos(a), 0, 12.5],
                       [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    path = tmp_path / "ball.nii.gz"
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(path))
    return path, gt, affine


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_segment_nifti_writes_labels_on_its_grid(ball_nifti, tmp_path, capsys) -> None:
    path, gt, affine = ball_nifti
    out, overlay = tmp_path / "labels.nii.gz", tmp_path / "ov.png"
    ks = np.nonzero(gt.any(axis=(1, 2)))[0]
    box3d = ["17", "11", str(ks.min()), "44", "34", str(ks.max() + 1)]  # the ball's tight box, i j k
    code = main(["segment", str(path), "--box3d", *box3d, "--out", str(out), "--overlay", str(overlay)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)  # same voxel-to-world mapping
    assert written.shape == (56, 48, 16) and written.get_data_dtype() == np.uint8
    labels = np.asarray(written.dataobj).transpose(2, 1, 0) > 0
    # LiteMedSAM, zero-shot, from the tight 3D box (loose on the ball's tips, where the box is the whole extent)
    assert _dice(labels, gt) > 0.8
    mid = int(ks.mean())
    assert _dice(labels[mid], gt[mid]) > 0.9
    assert not labels[: ks.min()].any() and not labels[ks.max() + 1:].any()  # nothing outside the box's slices
    assert summary["foreground_voxels"] == int(labels.sum())
    assert summary["volume_ml"] == pytest.approx(labels.sum() * 0.8 * 0.7 * 2.5 / 1000, rel=1e-3)
    assert overlay.exists() and summary["overlay_slice"] == int(np.argmax(labels.sum(axis=(1, 2))))

    # one box on the middle slice, followed through the volume
    out2 = tmp_path / "prop.nii.gz"
    code = main(["segment", str(path), "--box3d", "17", "11", str(mid), "44", "34", str(mid + 1), "--propagate",
                 "--out", str(out2)])
    capsys.readouterr()
    assert code == 0
    prop = np.asarray(nib.load(str(out2)).dataobj).transpose(2, 1, 0) > 0
    assert _dice(prop, gt) > 0.8


def test_segment_dicom_series_to_nifti_keeps_the_geometry(tmp_path, capsys) -> None:
    from tests.io.test_dicom import _write_series

    from imedsam import io

    folder = tmp_path / "series"
    _write_series(folder, [0.0, 2.0, 4.0, 6.0])
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", str(folder), "--box3d", "40", "3", "1", "81", "47", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    series = io.read(folder)
    written = io.read(out)
    np.testing.assert_allclose(np.asarray(written.geometry.affine), np.asarray(series.geometry.affine), atol=1e-4)
    assert written.geometry.shape == series.geometry.shape == (4, 128, 128)
    assert written.array[1:3].any() and not written.array[[0, 3]].any()  # slices k = 1, 2 only


def test_volume_argument_errors_before_any_work(ball_nifti, tmp_path, capsys, monkeypatch) -> None:
    import imedsam.infer.segmenter as segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(segmenter.Segmenter, "__init__", refuse)
    path, _, _ = ball_nifti
    out = tmp_path / "labels.nii.gz"
    png = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(png)
    box3d = ["--box3d", "1", "1", "1", "9", "9", "5"]
    cases = [
        ([str(path), "--box", "1", "1", "9", "9", "--out", str(out)], "--box3d"),
        ([str(path), "--point", "5", "5", "1", "--out", str(out)], "I J K LABEL"),
        ([str(path), "--point", "5", "5", "99", "1", "--out", str(out)], "outside the 56x48x16"),
        ([str(path), *box3d, "--out", str(tmp_path / "labels.png")], ".nii.gz"),
        ([str(path), *box3d, "--out", str(path)], "inputs are never overwritten"),
        ([str(path), "--auto", "--out", str(out)], "--auto"),
        ([str(path), *box3d, "--size", "9", "9", "--out", str(out)], "--size"),
        ([str(path), "--box3d", "1", "1", "4", "9", "9", "4", "--out", str(out)], "degenerate"),
        ([str(png), *box3d, "--out", str(tmp_path / "m.png")], "2D image"),
        ([str(png), "--point", "1", "2", "3", "1", "--out", str(tmp_path / "m.png")], "X Y LABEL"),
    ]
    for argv, message in cases:
        code = main(["segment", *argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not out.exists() and not (tmp_path / "m.png").exists()
