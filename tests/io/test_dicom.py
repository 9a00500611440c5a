"""DICOM: the embedded CT slice (rescale, spacing, windows), series folders, dispatch and errors."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import imedsam.io as io
from imedsam.errors import ImedsamError
from imedsam.io.samples import embedded_ct_slice


@pytest.fixture(scope="module")
def ct():
    return io.read(embedded_ct_slice())


def test_embedded_ct_slice_exists():
    path = embedded_ct_slice()
    assert path.is_file() and path.name == "CT_small.dcm"


def test_ct_small_rescaled_to_hu(ct):
    ds = pydicom.dcmread(embedded_ct_slice())
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ct.array.dtype == np.float32 and ct.array.shape == (128, 128)
    np.testing.assert_allclose(ct.array, expected, atol=1e-3)
    assert float(ds.RescaleIntercept) == -1024.0  # so the comparison above really tests the rescale
    assert -1100 <= ct.array.min() < 0 < ct.array.max() <= 3100  # plausible HU
    assert ct.meta["modality"] == "CT" and ct.meta["units"] == "HU"
    assert ct.meta["rescale_intercept"] == -1024.0


def test_ct_small_geometry(ct):
    g = ct.geometry
    assert g.shape == (128, 128)
    assert g.spacing == pytest.approx((0.661468, 0.661468))
    assert g.origin == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert g.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # pixel (row 10, col 20): LPS = IPP + 20*dx*row_dir + 10*dy*col_dir; RAS flips x and y
    lps = np.array([-158.135803 + 20 * 0.661468, -179.035797 + 10 * 0.661468, -75.699997])
    np.testing.assert_allclose(g.index_to_world([10, 20]), lps * [-1, -1, 1], atol=1e-5)


def test_windows(ct):
    assert io.apply_window(np.array([-160.0, 40.0, 240.0, -2000.0, 5000.0]), 40, 400).tolist() == [0, 128, 255, 0, 255]
    assert ct.meta["window"] is None  # CT_small has no WindowCenter/WindowWidth
    bone = io.read_dicom(embedded_ct_slice(), window="bone")
    assert bone.meta["window"] == (400.0, 1800.0)
    np.testing.assert_array_equal(io.to_display_rgb(bone), io.to_display_rgb(ct, window=(400, 1800)))
    lung = io.to_display_rgb(ct, window="lung")
    soft = io.to_display_rgb(ct, window="soft_tissue")
    assert lung.shape == soft.shape == (128, 128, 3) and not np.array_equal(lung, soft)
    assert io.CT_WINDOWS["brain"] == (40.0, 80.0)
    with pytest.raises(ImedsamError, match="soft_tissue"):
        io.read_dicom(embedded_ct_slice(), window="liverish")
    with pytest.raises(ImedsamError, match="width"):
        io.to_display_rgb(ct, window=(40, 0))


def test_file_window_used_by_default():
    mr = io.read(get_testdata_file("MR_small.dcm"))
    assert mr.meta["modality"] == "MR" and mr.meta["window"] == (600.0, 1600.0)
    assert mr.array.dtype == np.int16  # no rescale tags: stored values kept
    np.testing.assert_array_equal(io.to_display_rgb(mr)[..., 0], io.apply_window(mr.array, 600, 1600))


def test_dicom_without_extension_dispatched_by_magic(tmp_path):
    target = tmp_path / "IM0001"
    shutil.copy(embedded_ct_slice(), target)
    assert io.read(target).meta["modality"] == "CT"


def test_dicom_errors(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 10 + b"definitely not dicom")
    with pytest.raises(ImedsamError, match="junk.dcm"):
        io.read(tmp_path / "junk.dcm")
    with pytest.raises(ImedsamError, match="no pixel data"):
        io.read_dicom(get_testdata_file("rtplan.dcm"))
    with pytest.raises(ImedsamError, match="file not found"):
        io.read_dicom(tmp_path / "missing.dcm")


# ------------------------------------------------------------------------------------------------ series


def _write_series(folder, zs, *, iop=(1, 0, 0, 0, 1, 0), uid=None):
    """Copies of CT_small at the given slice offsets along the normal; slice i's pixels are raw + i."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(embedded_ct_slice())
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    origin = np.array([-158.135803, -179.035797, -75.699997])
    rng = np.random.default_rng(0)
    names = [f"slice_{n:03d}.dcm" for n in rng.permutation(len(zs))]  # file names in a scrambled order
    for i, (z, name) in enumerate(zip(zs, names)):
        ds = pydicom.dcmread(embedded_ct_slice())  # fresh: Dataset.copy() is shallow
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in origin + z * normal]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(uid), str(iop), str(z), name])
        if uid is not None:
            ds.SeriesInstanceUID = uid
        ds.PixelData = (base.pixel_array + i).astype(np.int16).tobytes()
        ds.save_as(folder / name)
    return origin, row, col, normal


def test_series_sorted_along_normal_with_spacing(tmp_path):
    zs = [5.0, -2.5, 0.0, 2.5]  # slice i sits at zs[i]; sorted order is 1, 2, 3, 0
    origin, *_ = _write_series(tmp_path / "ct", zs)
    (tmp_path / "ct" / "readme.txt").write_text("not dicom")
    vol = io.read(tmp_path / "ct")
    raw = pydicom.dcmread(embedded_ct_slice()).pixel_array.astype(np.float32) - 1024
    assert vol.array.shape == (4, 128, 128) and vol.array.dtype == np.float32
    for k, i in enumerate([1, 2, 3, 0]):
        np.testing.assert_array_equal(vol.array[k], raw + i)
    assert vol.geometry.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert vol.geometry.origin == pytest.approx(tuple(origin + [0, 0, -2.5]))
    assert vol.meta["n_slices"] == 4 and vol.meta["uniform_spacing"]
    # world position of voxel (k, 0, 0) is slice k's ImagePositionPatient (RAS)
    for k, z in enumerate(sorted(zs)):
        np.testing.assert_allclose(vol.geometry.index_to_world([k, 0, 0]), (origin + [0, 0, z]) * [-1, -1, 1],
                                   atol=1e-5)


def test_oblique_series_matches_simpleitk(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # tilted coronal-ish plane
    _write_series(tmp_path / "obl", [0.0, 3.0, 6.0], iop=iop)
    vol = io.read_dicom_series(tmp_path / "obl")
    assert vol.geometry.spacing == pytest.approx((3.0, 0.661468, 0.661468))
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (extra 'volumes') not installed")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "obl")))
    ref = reader.Execute()
    assert vol.geometry.origin == pytest.approx(ref.GetOrigin(), abs=1e-4)
    assert vol.geometry.direction == pytest.approx(ref.GetDirection(), abs=1e-5)
    assert tuple(reversed(vol.geometry.spacing)) == pytest.approx(ref.GetSpacing(), abs=1e-4)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(ref), atol=1e-3)


def test_series_errors(tmp_path):
    _write_series(tmp_path / "dup", [0.0, 0.0])
    with pytest.raises(ImedsamError, match="same position|share one position"):
        io.read_dicom_series(tmp_path / "dup")
    _write_series(tmp_path / "two", [0.0], uid="1.2.3")
    _write_series(tmp_path / "two_b", [0.0], uid="1.2.4")
    for f in (tmp_path / "two_b").iterdir():
        shutil.move(str(f), tmp_path / "two" / ("b_" + f.name))
    with pytest.raises(ImedsamError, match="series_uid"):
        io.read_dicom_series(tmp_path / "two")
    one = io.read_dicom_series(tmp_path / "two", series_uid="1.2.4")
    assert one.array.shape == (1, 128, 128) and one.geometry.spacing[0] == pytest.approx(5.0)  # SliceThickness
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ImedsamError, match="no DICOM images"):
        io.read(tmp_path / "empty")


def test_series_without_positions_sorted_by_instance_number(tmp_path):
    _write_series(tmp_path / "nopos", [0.0, 2.5, 5.0])
    for f in (tmp_path / "nopos").iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    vol = io.read_dicom_series(tmp_path / "nopos")
    raw = pydicom.dcmread(embedded_ct_slice()).pixel_array.astype(np.float32) - 1024
    for k in range(3):  # InstanceNumber k + 1 holds raw + k
        np.testing.assert_array_equal(vol.array[k], raw + k)
    assert vol.geometry.spacing == pytest.approx((5.0, 0.661468, 0.661468))  # SliceThickness
    assert vol.geometry.affine is None and vol.geometry.origin is None
