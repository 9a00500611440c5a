"""The demo's embedded data set and its fine-tune -> evaluate loop (tiny backbone; the real one runs in `make demo`)."""

import json

import numpy as np
from PIL import Image

from imedsam.data import SegmentationDataset, discover
from imedsam.data.synthetic import make_synthetic_lesions


def test_synthetic_lesions_are_visible_and_split(tmp_path):
    root = make_synthetic_lesions(tmp_path / "d", n=10, size=64, seed=3)
    splits = json.loads((root / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    for stem in splits["train"]:
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png")) > 0
        assert 0.01 < mask.mean() < 0.5
    assert len(SegmentationDataset(discover(root), split="test")) == 2
    again = make_synthetic_lesions(tmp_path / "e", n=10, size=64, seed=3)
    np.testing.assert_array_equal(np.asarray(Image.open(again / "images" / "lesion_000.png")),
                                  np.asarray(Image.open(root / "images" / "lesion_000.png")))


def test_lesion_is_painted_inside_its_mask_only():
    from imedsam.data.synthetic import _background, make_lesion_image

    ct = np.tile(np.linspace(20, 230, 64, dtype=np.float32), (64, 1))
    for seed in range(5):
        image, mask = make_lesion_image(ct, 64, np.random.default_rng(seed))
        background = _background(ct, 64, np.random.default_rng(seed))  # the same draws, before painting
        change = np.abs(image.astype(float) - background)
        assert change[mask].mean() > 35  # contrast 50-90, noise aside, clipped at 0/255
        far = ~mask
        far[mask.any(1)] = False  # rows away from the lesion (its soft edge reaches just past the ellipse)
        assert change[far].mean() < 8  # only the 4-level noise elsewhere


def test_finetune_demo_trains_compares_and_reruns(tmp_path):
    from imedsam.demo import DEMO_PROMPTS, run_finetune_demo

    tiny = ["model.backbone=tiny_tinyvit_test", "optim.epochs=2", "objective.iterations=1", "data.image_size=64",
            "run.val_every=1"]
    data = make_synthetic_lesions(tmp_path / "data", n=10, size=64, seed=0)
    summary = run_finetune_demo(tmp_path / "out", data, device="cpu", overrides=tiny, zero_shot="tiny_tinyvit_test")
    assert set(summary["compare"]) == set(DEMO_PROMPTS) == {"box", "points:1"}
    for prompt, scores in summary["compare"].items():
        assert set(scores) == {"zero_shot", "fine_tuned"} and all(0.0 <= v <= 1.0 for v in scores.values())
    for name in ("fine_tuned_box", "zero_shot_box", "fine_tuned_points1", "zero_shot_points1"):
        html = (tmp_path / "out" / "report" / name / "report.html").read_text()
        assert "no overlay given" not in html and html.count("data:image/png;base64") >= 3, name
    # both models were scored on the same random points
    fine = json.loads((tmp_path / "out" / "report" / "fine_tuned_points1" / "prompts.json").read_text())
    zero = json.loads((tmp_path / "out" / "report" / "zero_shot_points1" / "prompts.json").read_text())
    assert fine == zero
    again = run_finetune_demo(tmp_path / "out", data, device="cpu", overrides=tiny,
                              zero_shot="tiny_tinyvit_test")  # resumes: nothing to redo
    assert again["best_val_dice"] == summary["best_val_dice"]
    assert again["compare"] == summary["compare"]
