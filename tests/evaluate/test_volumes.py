"""`imedsam evaluate --volumes`: per-volume, per-class 3-D scores in mm under the box / box3d / propagate
protocols (a stub predictor checks the protocol logic exactly; LiteMedSAM checks it end to end)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.conftest import write_nifti

import imedsam.evaluate.volumes as volumes
from imedsam.cli import main
from imedsam.data.volume_prompts import SliceFrame
from imedsam.evaluate.metrics import binary_metrics

SPACING = (2.5, 0.8, 0.7)  # (dz, dy, dx) mm


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8) (D, H, W) = (16, 48, 56): an ellipsoid (class 1) and a smaller one (class 2)
    on other slices, bright on noise."""
    d, h, w = np.meshgrid(np.arange(16), np.arange(48), np.arange(56), indexing="ij")
    a = ((d - 6) / 4) ** 2 + ((h - 18) / 9) ** 2 + ((w - 20) / 11) ** 2 <= 1
    b = ((d - 11) / 3) ** 2 + ((h - 34) / 6) ** 2 + ((w - 40) / 7) ** 2 <= 1
    labels = np.zeros(a.shape, np.uint8)
    labels[a], labels[b] = 1, 2
    rng = np.random.default_rng(0)
    image = (rng.normal(100, 10, a.shape) + 300 * (labels > 0)).astype(np.float32)
    return image, labels


@pytest.fixture
def volume_dataset(tmp_path):
    root = tmp_path / "Dataset002_Phantom"
    image, labels = _phantom()
    write_nifti(root / "imagesTs" / "ph_000_0000.nii.gz", image, spacing=SPACING)
    write_nifti(root / "labelsTs" / "ph_000.nii.gz", labels, spacing=SPACING)
    write_nifti(root / "imagesTr" / "ph_001_0000.nii.gz", image, spacing=SPACING)
    write_nifti(root / "labelsTr" / "ph_001.nii.gz", labels, spacing=SPACING)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"},
                                                   "labels": {"background": 0, "a": 1, "b": 2},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def test_volume_prompts_of_the_protocols() -> None:
    _, labels = _phantom()
    gt = labels == 1
    frame = SliceFrame("k")
    box3d = volumes.volume_prompt("box3d", gt, frame)
    idx = np.nonzero(gt)
    assert box3d.box3d == (idx[2].min(), idx[1].min(), idx[0].min(), idx[2].max() + 1, idx[1].max() + 1,
                           idx[0].max() + 1) and not box3d.propagate
    prop = volumes.volume_prompt("propagate", gt, frame)
    ks = np.nonzero(gt.any(axis=(1, 2)))[0]
    mid = int(ks[(len(ks) - 1) // 2])
    ys, xs = np.nonzero(gt[mid])
    assert prop.propagate and prop.box3d == (xs.min(), ys.min(), mid, xs.max() + 1, ys.max() + 1, mid + 1)
    assert volumes.volume_prompt("box3d", np.zeros_like(gt), frame) is None
    with pytest.raises(Exception, match="--volumes"):
        volumes.check_volume_protocol("points:1")


@pytest.mark.parametrize("protocol", ["box", "box3d", "propagate"])
def test_protocol_logic_with_a_perfect_slice_predictor(monkeypatch, protocol) -> None:
    """A predictor that returns the ground truth inside the prompted box: every protocol recovers each object
    exactly (Dice 1, HD95 0 mm), prompting the slices the protocol says."""
    image, labels = _phantom()
    calls: list[int] = []

    def perfect(system, case, **kwargs):
        calls.append(case.slice_index)
        x0, y0, x1, y1 = (int(v) for v in case.box)
        out = np.zeros_like(case.gt)
        out[y0:y1, x0:x1] = case.gt[y0:y1, x0:x1]
        return out

    encodes: list[int] = []
    monkeypatch.setattr(volumes, "predict_slice", perfect)
    monkeypatch.setattr(volumes, "encode_case", lambda system, case, *a, **k: encodes.append(case.slice_index) or "emb")
    display = np.clip(image, 0, 255).astype(np.uint8)
    results = volumes.evaluate_volume(None, "ph", display, labels, SPACING, protocol, frame=SliceFrame("k"),
                                      device="cpu")
    assert [r.row["class"] for r in results] == [1, 2]
    for r in results:
        gt = labels == r.row["class"]
        gt_slices = int(gt.any(axis=(1, 2)).sum())
        assert r.row["dice"] == 1.0 and r.row["hd95"] == 0.0 and r.row["gt_slices"] == gt_slices
        expected = {"box": gt_slices, "box3d": gt_slices, "propagate": gt_slices + 2}[protocol]
        assert r.row["slices_prompted"] == expected  # propagation also visits one empty slice on each side
    assert len(calls) == sum(r.row["slices_prompted"] for r in results)
    if protocol == "box":  # slice by slice: one encoder pass per slice, for all the objects on it
        assert encodes == [int(k) for k in np.nonzero((labels > 0).any(axis=(1, 2)))[0]]


def test_scores_are_3d_and_in_mm(monkeypatch) -> None:
    """A predictor that misses one whole slice: the row's metrics are the 3-D ones with the volume's spacing."""
    image, labels = _phantom()
    gt = labels == 1
    missed = int(np.nonzero(gt.any(axis=(1, 2)))[0].max())

    def drop_last(system, case, **kwargs):
        return np.zeros_like(case.gt) if case.slice_index == missed else case.gt.copy()

    monkeypatch.setattr(volumes, "predict_slice", drop_last)
    monkeypatch.setattr(volumes, "encode_case", lambda *a, **k: "embedding")
    results = volumes.evaluate_volume(None, "ph", image.astype(np.uint8), labels, SPACING, "box",
                                      frame=SliceFrame("k"), device="cpu", nsd_tolerance=1.0)
    pred = gt.copy()
    pred[missed] = False
    want = binary_metrics(pred, gt, spacing=SPACING, nsd_tolerance=1.0)
    row = results[0].row
    assert row["dice"] == pytest.approx(want["dice"]) and row["hd95"] == pytest.approx(want["hd95"])
    assert row["hd"] == pytest.approx(2.5)  # the missed slice is one dz = 2.5 mm from the rest
    assert row["nsd"] == pytest.approx(want["nsd"])


def test_cli_evaluate_volumes_end_to_end(volume_dataset, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", "--model", "litemedsam", "--data", str(volume_dataset), "--volumes",
                 "--nsd-tolerance", "1", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["volumes"] == 1 and summary["rows"] == 2 and set(summary["dice_per_class"]) == {"1", "2"}
    assert summary["dice"] > 0.85  # zero-shot LiteMedSAM from every slice's tight box
    written = json.loads((out / "summary.json").read_text())
    assert written["config"]["prompt"] == "box" and "mm" in written["conventions"]["distance_unit"]
    html = (out / "report.html").read_text()
    assert "no overlay given" not in html and html.count("data:image/png;base64") >= 2
    # propagation from one slice's box, on the same volume
    assert main(["evaluate", "--model", "litemedsam", "--data", str(volume_dataset), "--volumes", "--prompt",
                 "propagate", "--out", str(tmp_path / "r2"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] > 0.75


def test_cli_volume_flags_are_checked_first(volume_dataset, tmp_path, capsys) -> None:
    cases = [
        (["--volumes", "--prompt", "points:1"], "--volumes"),
        (["--volumes", "--sweep", "64,128"], "--sweep"),
        (["--axis", "j"], "--axis"),
        (["--volumes", "--axis", "q"], "invalid choice"),
    ]
    for extra, message in cases:
        try:
            code = main(["evaluate", "--model", "litemedsam", "--data", str(volume_dataset), "--out",
                         str(tmp_path / "r"), *extra])
        except SystemExit as exc:  # argparse's own errors exit from the parser
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "r").exists()
