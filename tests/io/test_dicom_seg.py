"""DICOM-SEG output (highdicom): label maps of DICOM inputs read back identical, frame by frame on their source
slices; refusals before any model work."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch

from imedsam import io
from imedsam.cli import main
from imedsam.errors import ImedsamError
from imedsam.io.samples import embedded_ct_slice
from tests.io.test_dicom import _write_series

hd = pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (in the test extra)")


def _read_seg(path, source_folder, sample):
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(source_folder / f, stop_before_pixels=True).SOPInstanceUID for f in sample.meta["files"]]
    return seg, seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=True)


def test_round_trip_on_a_series(tmp_path):
    from imedsam.io.dicom_seg import source_headers, write_dicom_seg

    _write_series(tmp_path / "s", [0.0, 2.0, 4.0, 6.0])
    sample = io.read(tmp_path / "s")
    labels = np.zeros(sample.array.shape, np.uint8)
    labels[1:3, 30:60, 40:70] = 2
    labels[2, 80:90, 80:90] = 7
    path = write_dicom_seg(tmp_path / "seg.dcm", labels, source_headers(sample), names={7: "lesion"})
    seg, got = _read_seg(path, tmp_path / "s", sample)
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["object 2", "lesion"]
    np.testing.assert_array_equal(got, np.select([labels == 2, labels == 7], [1, 2], 0))
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 3  # empty frames omitted


def test_refusals(tmp_path):
    from imedsam.io.dicom_seg import check_dicom_seg, source_headers, write_dicom_seg

    ct = io.read(embedded_ct_slice())
    with pytest.raises(ImedsamError, match="empty"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros(ct.array.shape, np.uint8), source_headers(ct))
    with pytest.raises(ImedsamError, match="do not match"):
        write_dicom_seg(tmp_path / "x.dcm", np.ones((3, 4), np.uint8), source_headers(ct))
    png = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(ImedsamError, match="not DICOM"):
        check_dicom_seg(io.read(png), "--out x.dcm")


def test_cli_writes_dicom_seg_for_a_series_and_a_slice(tmp_path, capsys):
    _write_series(tmp_path / "s", [0.0, 2.0, 4.0])
    out = tmp_path / "seg.dcm"
    torch.manual_seed(0)  # the tiny test model is random-init: the same weights for both runs
    code = main(["segment", str(tmp_path / "s"), "--box3d", "20", "20", "0", "100", "100", "3", "--out", str(out),
                 "--model", "tiny_vit_test", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    sample = io.read(tmp_path / "s")
    nifti = tmp_path / "seg.nii.gz"
    torch.manual_seed(0)
    assert main(["segment", str(tmp_path / "s"), "--box3d", "20", "20", "0", "100", "100", "3", "--out",
                 str(nifti), "--model", "tiny_vit_test", "--device", "cpu"]) == 0
    expected = io.read(nifti).array > 0
    assert expected.any()
    _, got = _read_seg(out, tmp_path / "s", sample)
    np.testing.assert_array_equal(got > 0, expected)

    slice_out = tmp_path / "slice_seg.dcm"
    capsys.readouterr()
    torch.manual_seed(0)
    assert main(["segment", str(embedded_ct_slice()), "--box", "30", "30", "100", "100", "--out", str(slice_out),
                 "--model", "tiny_vit_test", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["foreground_pixels"] > 0
    seg = hd.seg.segread(slice_out)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        pydicom.dcmread(embedded_ct_slice()).SOPInstanceUID


@pytest.mark.parametrize("argv, needle", [
    (["--box", "1", "1", "5", "5", "--out", "OUT/x.dcm"], "is not DICOM"),
    (["--box", "1", "1", "5", "5", "--out", "OUT/x.jpg"], "written as .png"),
])
def test_cli_refuses_before_the_model(tmp_path, capsys, monkeypatch, argv, needle):
    from PIL import Image

    import imedsam.infer.segmenter as segmenter

    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    monkeypatch.setattr(segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("model built"))
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    assert main(["segment", str(png), *argv, "--model", "tiny_vit_test"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not list(tmp_path.glob("x.*"))
