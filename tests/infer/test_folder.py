"""`imedsam predict`: a folder of images and volumes, prompts from a file / from label maps / automatic; outputs
named like the inputs with their geometry, reruns skip finished cases, a bad case does not stop the others."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from imedsam.cli import main
from imedsam.data.synthetic import make_synthetic_lesions
from imedsam.errors import ImedsamError
from imedsam.infer.folder import list_cases, load_prompt_file, prompts_from_labels


def _rows(folder):
    return {r["case"]: r for r in csv.DictReader(open(folder / "predictions.csv"))}


@pytest.fixture
def lesions(tmp_path):
    root = make_synthetic_lesions(tmp_path / "lesions", n=5, size=96, seed=1)
    return root / "images", root / "masks"


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_boxes_from_label_maps_reproduce_the_objects(lesions, tmp_path, capsys) -> None:
    images, masks = lesions
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(images), "-o", str(out), "--boxes-from", str(masks)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {**summary, "cases": 5, "done": 5, "skipped": 0, "failed": 0}
    dice = []
    for path in sorted(images.iterdir()):
        pred = np.asarray(Image.open(out / f"{path.stem}.png"))
        gt = np.asarray(Image.open(masks / path.name)) > 0
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1}  # label values as they are
        dice.append(_dice(pred == 1, gt))
    assert np.mean(dice) > 0.7  # zero-shot LiteMedSAM from each lesion's tight box (synthetic lesions)
    # exactly what the Segmenter gives for that box
    from imedsam.data.prompts import box_from_mask
    from imedsam.infer.segmenter import Segmenter

    seg = Segmenter("litemedsam")
    seg.set_image(np.asarray(Image.open(images / "lesion_000.png")))
    want = seg.predict(box=box_from_mask(np.asarray(Image.open(masks / "lesion_000.png")) > 0)).masks[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "lesion_000.png")) == 1, want)
    rows = _rows(out)
    assert all(r["status"] == "ok" and r["prompt"] == "labels" and r["objects"] == "1" for r in rows.values())
    # a rerun skips every finished case; --overwrite redoes them
    stamp = (out / "lesion_000.png").stat().st_mtime_ns
    assert main(["predict", "-i", str(images), "-o", str(out), "--boxes-from", str(masks)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 5
    assert (out / "lesion_000.png").stat().st_mtime_ns == stamp
    assert main(["predict", "-i", str(images), "-o", str(out), "--boxes-from", str(masks), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 5


def test_prompt_file_mixes_images_and_volumes_and_a_bad_case_does_not_stop_the_rest(tmp_path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(src / "a.png")
    (src / "broken.png").write_bytes(b"not a png")
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    nib.save(nib.Nifti1Image(rng.normal(size=(30, 20, 6)).astype(np.float32), affine), str(src / "vol.nii.gz"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({
        "a": [{"box": [5, 5, 30, 30], "label": 3}, {"points": [[40, 30, 1]], "label": 7}],
        "broken": {"box": [1, 1, 5, 5]},
        "vol": {"box3d": [2, 3, 1, 20, 15, 4], "label": 2},
    }))
    out = tmp_path / "out"
    code = main(["predict", "-i", str(src), "-o", str(out), "--prompts", str(prompts), "--model", "tiny_vit_test"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["done"] == 2 and summary["failed"] == 1  # exit 1: a case failed
    rows = _rows(out)
    assert rows["broken"]["status"].startswith("error:") and rows["a"]["status"] == "ok"
    labels = np.asarray(Image.open(out / "a.png"))
    assert set(np.unique(labels)) <= {0, 3, 7} and labels.shape == (40, 48)
    written = nib.load(str(out / "vol.nii.gz"))
    np.testing.assert_allclose(written.affine, affine)  # the volume's geometry
    vol = np.asarray(written.dataobj)  # (i, j, k)
    assert set(np.unique(vol)) <= {0, 2} and not vol[..., [0, 4, 5]].any()  # only the box's slices k = 1..3
    assert not (src / "a.png.tmp").exists() and sorted(p.name for p in src.iterdir()) == [
        "a.png", "broken.png", "vol.nii.gz"]  # inputs untouched


def test_prompt_files_and_label_prompts_are_checked() -> None:
    lab = np.zeros((4, 10, 12), np.uint8)
    lab[1:3, 2:5, 3:9] = 2
    (obj,) = prompts_from_labels(lab)
    assert obj.label == 2 and obj.box3d == (3, 2, 1, 9, 5, 3)
    (mid,) = prompts_from_labels(lab, propagate=True)
    assert mid.propagate and mid.box3d == (3, 2, 1, 9, 5, 2)  # the middle slice of k = 1, 2 (lower middle)
    (flat,) = prompts_from_labels(lab[1])
    assert flat.box == (3, 2, 9, 5)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"a": {"box": [1, 2, 3]}}', "box must be 4 numbers"),
    ('{"a": {"boxx": [1, 2, 3, 4]}}', "unknown key"),
    ('{"a": {"label": 2}}', "no prompt"),
    ('{"a": {"points": [[1, 2]]}}', "points must be"),
    ('{"a": {"box": [1, 2, 3, 4], "label": 0}}', "label must be"),
])
def test_bad_prompt_files_name_the_file_and_case(tmp_path, content, message) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ImedsamError, match=message):
        load_prompt_file(path)


def test_predict_argument_errors_before_any_work(lesions, tmp_path, capsys, monkeypatch) -> None:
    import imedsam.infer.segmenter as segmenter

    monkeypatch.setattr(segmenter.Segmenter, "__init__",
                        lambda *a, **k: pytest.fail("the model was loaded before the arguments were checked"))
    images, masks = lesions
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"nobody": {"box": [1, 1, 5, 5]}}')
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["-i", str(images), "-o", str(images / "out"), "--boxes-from", str(masks)], "inside the input"),
        (["-i", str(images), "-o", str(tmp_path / "o"), "--prompts", str(wrong)], "names none of the cases"),
        (["-i", str(empty), "-o", str(tmp_path / "o"), "--auto"], "no image, volume or DICOM"),
        (["-i", str(images), "-o", str(tmp_path / "o"), "--boxes-from", str(tmp_path / "nowhere")], "not a folder"),
        (["-i", str(images), "-o", str(tmp_path / "o")], "one of the arguments"),
    ]
    for argv, message in cases:
        code = main(["predict", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()
    assert [name for name, _ in list_cases(images)] == [f"lesion_{i:03d}" for i in range(5)]
