"""Volumes: NIfTI axis order and geometry, write-back onto the same grid, MHA/NRRD (optional), real LA MRI."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import imedsam.io as io
from imedsam.errors import ImedsamError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
LA_IMAGE = SHARED_DATA / "la-mri" / "imagesTr" / "la_000_0000.nii.gz"
LA_LABEL = SHARED_DATA / "la-mri" / "labelsTr" / "la_000.nii.gz"


def _oblique_affine(spacing=(0.625, 0.625, 0.625)) -> np.ndarray:
    """Rotation of 30 degrees about z and 10 about x, anisotropic-capable spacing, an offset."""
    a, b = np.deg2rad(30), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = [-90.5, 12.25, 40.0]
    return aff


def _corners(shape) -> np.ndarray:
    return np.array([[d, h, w] for d in (0, shape[0] - 1) for h in (0, shape[1] - 1) for w in (0, shape[2] - 1)])


@pytest.fixture
def oblique_nifti(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # (X, Y, Z)
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, _oblique_affine((0.625, 0.8, 2.5))), str(path))
    return path, data


def test_nifti_axis_order_spacing_and_affine(oblique_nifti):
    path, data = oblique_nifti
    s = io.read(path)
    assert s.array.shape == (7, 6, 5) and s.geometry.shape == (7, 6, 5) and s.is_volume
    assert s.array.dtype == np.int16
    assert s.array[3, 2, 1] == data[1, 2, 3]  # array[k, j, i] == nifti[i, j, k]
    np.testing.assert_array_equal(s.array, data.transpose(2, 1, 0))
    assert s.geometry.spacing == pytest.approx((2.5, 0.8, 0.625))  # (dz, dy, dx)
    np.testing.assert_allclose(np.array(s.geometry.affine), nib.load(str(path)).affine)
    # index_to_world takes array-order indices
    aff = nib.load(str(path)).affine
    np.testing.assert_allclose(s.geometry.index_to_world([3, 2, 1]), (aff @ np.array([1, 2, 3, 1.0]))[:3])


def test_write_volume_round_trip_keeps_voxel_to_world(oblique_nifti, tmp_path):
    path, _ = oblique_nifti
    image = io.read(path)
    pred = image.array > 100  # a "prediction" on the same grid (bool)
    out = io.write_volume(tmp_path / "pred" / "mask.nii.gz", pred, like=image)
    back = io.read(out)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, pred.astype(np.uint8))
    assert back.geometry.shape == image.geometry.shape
    np.testing.assert_array_equal(np.array(back.geometry.affine), np.array(image.geometry.affine))
    corners = _corners(image.geometry.shape)
    np.testing.assert_array_equal(back.geometry.index_to_world(corners), image.geometry.index_to_world(corners))
    src, dst = nib.load(str(path)).header, nib.load(str(out)).header
    assert (int(dst["qform_code"]), int(dst["sform_code"])) == (int(src["qform_code"]), int(src["sform_code"]))
    np.testing.assert_allclose(dst.get_qform(), src.get_qform(), atol=1e-6)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_write_volume_rejects_wrong_shape_and_suffix(oblique_nifti, tmp_path):
    image = io.read(oblique_nifti[0])
    with pytest.raises(ImedsamError, match=r"does not match.*\(7, 6, 5\)"):
        io.write_volume(tmp_path / "x.nii.gz", np.zeros((5, 6, 7), np.uint8), like=image)
    with pytest.raises(ImedsamError, match=r"\.nii\.gz"):
        io.write_volume(tmp_path / "x.png", image.array, like=image)


def test_nifti_4d_and_corrupt_files(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii"))
    with pytest.raises(ImedsamError, match="four.nii.*3D"):
        io.read(tmp_path / "four.nii")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii"))
    assert io.read(tmp_path / "one.nii").array.shape == (5, 4, 3)
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ImedsamError, match="bad.nii.gz"):
        io.read(tmp_path / "bad.nii.gz")
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), str(good))
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ImedsamError, match="cut.nii.gz"):
        io.read(tmp_path / "cut.nii.gz")


def test_nifti_geometry_matches_simpleitk(oblique_nifti):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (extra 'volumes') not installed")
    path, _ = oblique_nifti
    s = io.read(path)
    ref = sitk.ReadImage(str(path))
    assert s.geometry.origin == pytest.approx(ref.GetOrigin(), abs=1e-4)
    assert s.geometry.direction == pytest.approx(ref.GetDirection(), abs=1e-5)
    assert tuple(reversed(s.geometry.spacing)) == pytest.approx(ref.GetSpacing(), abs=1e-5)
    np.testing.assert_array_equal(s.array, sitk.GetArrayFromImage(ref))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_round_trip(oblique_nifti, tmp_path, suffix):
    pytest.importorskip("SimpleITK", reason="SimpleITK (extra 'volumes') not installed")
    image = io.read(oblique_nifti[0])
    out = io.write_volume(tmp_path / f"vol{suffix}", image.array, like=image)
    back = io.read(out)
    np.testing.assert_array_equal(back.array, image.array)
    corners = _corners(image.geometry.shape)
    np.testing.assert_allclose(back.geometry.index_to_world(corners), image.geometry.index_to_world(corners),
                               atol=1e-4)
    # and from ITK back to NIfTI: still the same grid
    again = io.read(io.write_volume(tmp_path / "again.nii", back.array, like=back))
    np.testing.assert_allclose(again.geometry.index_to_world(corners), image.geometry.index_to_world(corners),
                               atol=1e-4)


def test_itk_formats_need_simpleitk(tmp_path, monkeypatch):
    (tmp_path / "v.mha").write_bytes(b"ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
    with pytest.raises(ImedsamError, match=r"v\.mha.*pip install"):
        io.read(tmp_path / "v.mha")


def test_volume_from_dicom_series_written_as_nifti(tmp_path):
    from tests.io.test_dicom import _write_series

    _write_series(tmp_path / "series", [0.0, 2.5, 5.0])
    vol = io.read_volume(tmp_path / "series")
    out = io.write_volume(tmp_path / "series.nii.gz", vol.array > 0, like=vol)
    back = io.read(out)
    corners = _corners(vol.geometry.shape)
    np.testing.assert_allclose(back.geometry.index_to_world(corners), vol.geometry.index_to_world(corners), atol=1e-4)
    assert back.geometry.spacing == pytest.approx(vol.geometry.spacing, abs=1e-5)


@pytest.mark.skipif(not LA_IMAGE.is_file(), reason=f"shared data not found at {SHARED_DATA} (optional)")
def test_real_la_mri_volume_and_label(tmp_path):
    image = io.read(LA_IMAGE)
    label = io.read(LA_LABEL)
    d, h, w = image.array.shape
    assert d == 88 and 130 <= h <= 250 and 130 <= w <= 250
    assert image.array.dtype == np.float32
    assert image.geometry.spacing == pytest.approx((0.625, 0.625, 0.625))
    assert label.geometry.shape == image.geometry.shape
    assert set(np.unique(label.array)) <= {0, 1} and label.array.any()
    np.testing.assert_allclose(np.array(label.geometry.affine), np.array(image.geometry.affine))
    out = io.write_volume(tmp_path / "la_000.nii.gz", label.array.astype(bool), like=image)
    back = io.read(out)
    np.testing.assert_array_equal(back.array, label.array)
    np.testing.assert_array_equal(np.array(back.geometry.affine), np.array(image.geometry.affine))
