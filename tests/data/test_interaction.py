"""Simulated users: corrective clicks on hand-made masks, SAM-Med2D's random test points, NoC, prompt files."""

from __future__ import annotations

import numpy as np
import pytest

from imedsam.data.interaction import (
    Protocol,
    draw_points,
    load_prompts,
    next_click,
    noc,
    parse_protocol,
    save_prompts,
)
from imedsam.errors import ImedsamError


def test_first_click_is_the_interior_of_the_object():
    gt = np.zeros((20, 30), bool)
    gt[4:15, 6:21] = True  # 11 x 15 rectangle: interior-most pixels on its middle row
    (x, y), label = next_click(np.zeros_like(gt), gt)
    assert label == 1 and gt[int(y), int(x)]
    assert y == 9 and 11 <= x <= 15  # distance to the border is maximal (6) on row 9, columns 11..15


def test_click_goes_to_the_largest_error_region_with_the_right_label():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[30:38, 28:38] = True  # false positive, 80 px
    pred[5:10, 5:25] = False  # false negative strip, 100 px: the larger one
    (x, y), label = next_click(pred, gt)
    assert label == 1 and 5 <= y < 10 and gt[int(y), int(x)] and not pred[int(y), int(x)]
    pred[5:10, 5:25] = True  # fixed: now the false positive is the only error
    (x, y), label = next_click(pred, gt)
    assert label == 0 and 30 <= y < 38 and 28 <= x < 38
    assert next_click(gt, gt) is None


def test_image_border_counts_as_region_border():
    gt = np.zeros((10, 40), bool)
    gt[:, :20] = True  # touches the left border: the interior is away from it, not at column 0
    (x, y), _ = next_click(np.zeros_like(gt), gt)
    assert 4 <= x <= 15 and 4 <= y <= 5


def test_noc_is_the_first_click_reaching_the_threshold_capped_at_n():
    seq = [0.5, 0.84, 0.86, 0.91, 0.89]
    assert noc(seq, 0.85) == 3 and noc(seq, 0.90) == 4 and noc(seq, 0.95) == 5
    assert noc([0.95], 0.9) == 1


def test_random_points_follow_sammed2d_and_are_seeded():
    gt = np.zeros((30, 30), bool)
    gt[10:20, 10:20] = True
    for n, fg in ((1, 1), (3, 1), (5, 2), (9, 4)):
        pts, labels = draw_points(gt, n, np.random.default_rng(0))
        assert len(pts) == n and labels.sum() == fg
        inside = gt[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        assert np.array_equal(inside, labels == 1)
    a = draw_points(gt, 5, np.random.default_rng([0, 3, 5]))[0]
    b = draw_points(gt, 5, np.random.default_rng([0, 3, 5]))[0]
    assert np.array_equal(a, b)


def test_protocol_parsing_and_prompt_files(tmp_path):
    assert parse_protocol("box") == Protocol("box") and parse_protocol("Clicks:5") == Protocol("clicks", 5)
    for bad in ("points", "points:0", "clicks:x", "lasso:3"):
        with pytest.raises(ImedsamError, match="--prompt"):
            parse_protocol(bad)
    p = Protocol("points", 3)
    prompts = {"a": {"points": [[1.0, 2.0]], "labels": [1]}}
    save_prompts(tmp_path / "p.json", prompts, p, seed=4)
    assert load_prompts(tmp_path / "p.json", p, ["a"]) == prompts
    with pytest.raises(ImedsamError, match="not 'points:5'"):
        load_prompts(tmp_path / "p.json", Protocol("points", 5), ["a"])
    with pytest.raises(ImedsamError, match="no prompt for 1 case"):
        load_prompts(tmp_path / "p.json", p, ["a", "b"])
