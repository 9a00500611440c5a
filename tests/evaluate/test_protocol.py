"""`imedsam evaluate` protocol options: ground truth from another folder (--gt-dir) and jittered boxes."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imedsam.cli import main
from imedsam.errors import ImedsamError
from imedsam.evaluate.api import run_evaluation


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """4 gray 24x32 images with a bright rectangle (the mask), splits.json test = all; plus the masks at 2x."""
    root = tmp_path_factory.mktemp("squares")
    data, big = root / "data", root / "masks_2x"
    for d in (data / "images", data / "masks", big):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    stems = []
    for i in range(4):
        mask = np.zeros((24, 32), np.uint8)
        y0, x0 = rng.integers(2, 10), rng.integers(2, 14)
        mask[y0:y0 + rng.integers(6, 12), x0:x0 + rng.integers(6, 14)] = 255
        image = (30 + 0.7 * mask + rng.normal(0, 8, mask.shape)).clip(0, 255).astype(np.uint8)
        stem = f"sq{i}"
        Image.fromarray(image).save(data / "images" / f"{stem}.png")
        Image.fromarray(mask).save(data / "masks" / f"{stem}.png")
        Image.fromarray(np.kron(mask, np.ones((2, 2), np.uint8))).save(big / f"{stem}.png")
        stems.append(stem)
    (data / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": stems}))
    return data, big


def _rows(report):
    return list(csv.DictReader(open(report / "cases.csv")))


def _evaluate(data, out, **options):
    torch.manual_seed(0)  # the tiny model's random weights
    base = {"run": None, "model": "tiny_tinyvit_test", "checkpoint": None, "data": data, "split": "test",
            "sizes": [None], "sweep": False, "out": out, "device": "cpu"}
    return run_evaluation(**{**base, **options})


def test_gt_dir_scores_against_the_other_grid(squares, tmp_path):
    data, big = squares
    _evaluate(data, tmp_path / "gt_dir", gt_dir=big)
    _evaluate(data, tmp_path / "resized", sizes=[(48, 64)])
    with_dir, resized = _rows(tmp_path / "gt_dir"), _rows(tmp_path / "resized")
    assert {r["grid"] for r in with_dir} == {"48x64"}  # native = the --gt-dir masks' grid
    # the 2x masks are the nearest-resized dataset masks: the same scores as predicting at 48x64 without them
    assert [r["dice"] for r in with_dir] == [r["dice"] for r in resized]
    summary = json.loads((tmp_path / "gt_dir" / "summary.json").read_text())
    assert summary["config"]["gt_dir"] == str(big)


def test_gt_dir_errors_name_the_problem(squares, tmp_path):
    data, big = squares
    with pytest.raises(ImedsamError, match="--gt-dir: folder not found"):
        _evaluate(data, tmp_path / "r", gt_dir=tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(partial / "sq0.png")
    with pytest.raises(ImedsamError, match=r"no mask named sq1\.\*"):
        _evaluate(data, tmp_path / "r", gt_dir=partial)
    for i in range(4):
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(partial / f"sq{i}.png")
    with pytest.raises(ImedsamError, match="aspect ratio"):
        _evaluate(data, tmp_path / "r", gt_dir=partial)
    assert not (tmp_path / "r").exists()


def test_box_jitter_is_seeded_and_recorded(squares, tmp_path, capsys):
    data, _ = squares
    args = ["evaluate", "--model", "tiny_tinyvit_test", "--data", str(data), "--device", "cpu"]
    for name, extra in [("tight", []), ("a", ["--box-jitter", "2,6"]), ("b", ["--box-jitter", "2,6"]),
                        ("c", ["--box-jitter", "2,6", "--seed", "1"])]:
        torch.manual_seed(0)  # the tiny model's random weights
        assert main(args + ["--out", str(tmp_path / name)] + extra) == 0
    tight, a, b, c = (_rows(tmp_path / n) for n in ("tight", "a", "b", "c"))
    assert a == b  # same seed, same boxes, same scores

    def boxes(rows):
        return np.array([[float(v) for v in r["box"].split()] for r in rows])

    grow = (boxes(a) - boxes(tight)) * [-1, -1, 1, 1]  # outward move of each side
    limit = np.array([0, 0, 32, 24]) - boxes(tight)  # as far as the image allows
    assert np.all((grow >= 2) & (grow < 6) | (grow == np.abs(limit)))
    assert not np.array_equal(boxes(a), boxes(c))  # another seed, other boxes
    prompt = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["prompt"]
    assert "expanded by U[2, 6) px (seed 0)" in prompt
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad"), "--box-jitter", "6,2"]) == 2
    assert "--box-jitter" in capsys.readouterr().err


def test_nsd_tolerance_and_empty_policy_reach_the_metrics(squares, tmp_path, capsys):
    data, _ = squares
    args = ["evaluate", "--model", "tiny_tinyvit_test", "--data", str(data), "--device", "cpu", "--size", "48", "64"]
    runs = {"t0": ["--nsd-tolerance", "0"], "t5": ["--nsd-tolerance", "5", "--empty-policy", "diagonal"],
            "empty": ["--min-component", "100000", "--empty-policy", "diagonal"]}
    for name, extra in runs.items():
        torch.manual_seed(0)  # the tiny model's random weights
        assert main(args + ["--out", str(tmp_path / name)] + extra) == 0
    t0, t5 = _rows(tmp_path / "t0"), _rows(tmp_path / "t5")
    for a, b in zip(t0, t5):
        assert a["dice"] == b["dice"]
        assert float(b["nsd"]) >= float(a["nsd"])  # a wider tolerance never lowers NSD
        if float(a["dice"]) > 0 and a["hd95"] != "":
            assert float(a["hd95"]) == float(b["hd95"])  # the policy only touches one-empty cases
    assert any(float(b["nsd"]) > float(a["nsd"]) for a, b in zip(t0, t5))
    # every prediction emptied: HD95 is the policy's sentinel, the 48x64 grid's diagonal
    assert {float(r["hd95"]) for r in _rows(tmp_path / "empty")} == {80.0}
    conventions = json.loads((tmp_path / "t5" / "summary.json").read_text())["conventions"]
    assert conventions["nsd_tolerance"] == "5 pixels" and "diagonal" in conventions["empty_one"]
    capsys.readouterr()
    for bad, message in [(["--empty-policy", "worst"], "--empty-policy"), (["--nsd-tolerance", "-1"], "nsd_tolerance")]:
        assert main(args + ["--out", str(tmp_path / "bad")] + bad) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_points_protocol_writes_its_prompts_and_reuses_them(squares, tmp_path):
    data, _ = squares
    a = _evaluate(data, tmp_path / "a", prompt="points:3", seed=5)
    drawn = json.loads((tmp_path / "a" / "prompts.json").read_text())
    assert drawn["protocol"] == "points:3" and drawn["seed"] == 5 and len(drawn["cases"]) == 4
    for case in drawn["cases"].values():
        assert case["labels"] == [1, 0, 0]
    rows = _rows(tmp_path / "a")
    assert all(r["points"].count(":") == 3 for r in rows)
    b = _evaluate(data, tmp_path / "b", prompt="points:3", seed=9, prompts_file=tmp_path / "a" / "prompts.json")
    assert json.loads((tmp_path / "b" / "prompts.json").read_text())["cases"] == drawn["cases"]
    assert b["dice"] == a["dice"] and [r["dice"] for r in _rows(tmp_path / "b")] == [r["dice"] for r in rows]
    _evaluate(data, tmp_path / "c", prompt="points:3", seed=9)
    assert json.loads((tmp_path / "c" / "prompts.json").read_text())["cases"] != drawn["cases"]
    with pytest.raises(ImedsamError, match="holds 'points:3' prompts"):
        _evaluate(data, tmp_path / "d", prompt="points:5", prompts_file=tmp_path / "a" / "prompts.json")


def test_clicks_protocol_reports_dice_per_click_and_noc(squares, tmp_path):
    data, _ = squares
    summary = _evaluate(data, tmp_path / "k", prompt="clicks:3")
    rows = _rows(tmp_path / "k")
    assert len(summary["dice_per_click"]) == 3 and 1 <= summary["noc85"] <= 3 and 1 <= summary["noc90"] <= 3
    for r in rows:
        curve = [float(r[f"dice_click_{i}"]) for i in (1, 2, 3)]
        assert float(r["dice"]) == pytest.approx(curve[-1])
        first = next((i for i, d in enumerate(curve, 1) if d >= 0.85), 3)
        assert int(r["noc85"]) == first
        assert r["points"].count(":") == 3
        assert r["points"].split()[0].endswith(":1")  # the first click adds the missing object
    assert summary["protocol"] == "clicks:3"
    with pytest.raises(ImedsamError, match="--tta"):
        _evaluate(data, tmp_path / "t", prompt="clicks:3", tta="h")


def test_a_folder_without_splits_is_scored_whole(squares, tmp_path):
    import shutil

    data, _ = squares
    plain = tmp_path / "plain"
    shutil.copytree(data, plain)
    (plain / "splits.json").unlink()
    summary = _evaluate(plain, tmp_path / "r")
    assert summary["cases"] == 4
    assert _evaluate(data, tmp_path / "r2", split="all")["cases"] == 4
    with pytest.raises(ImedsamError, match="has no 'validation' split; it has test"):
        _evaluate(data, tmp_path / "r3", split="validation")


def test_components_as_objects_split_a_class_into_its_pieces(tmp_path):
    from imedsam.data.cases import EvalCase, split_components

    gt = np.zeros((20, 20), bool)
    gt[1:5, 1:5] = True
    gt[10:18, 10:18] = True
    gt[0, 19] = True  # a 1-px speck
    case = EvalCase("img#c2", np.zeros((20, 20, 3), np.uint8), gt, box=np.array([0.0, 0, 20, 20]), stem="img",
                    class_id=2)
    parts = split_components([case], min_pixels=2)
    assert [p.case_id for p in parts] == ["img#c2#k1", "img#c2#k2"]
    assert [int(p.gt.sum()) for p in parts] == [16, 64]
    assert parts[1].prompt_box().tolist() == [10, 10, 18, 18] and parts[0].image_id == "img"
    single = EvalCase("one", np.zeros((20, 20, 3), np.uint8), gt & (np.arange(20)[None, :] < 8))
    assert split_components([single]) == [single]
