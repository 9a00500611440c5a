"""Boxes, box jitter, point sampling and error-region clicks on hand-checked masks."""

from __future__ import annotations

import numpy as np
import pytest

from imedsam.data import box_from_mask, clicks_from_error, jitter_box, sample_points, validate_box
from imedsam.errors import ImedsamError


def _mask() -> np.ndarray:
    m = np.zeros((30, 40), bool)
    m[5:12, 8:20] = True      # rows 5..11, cols 8..19
    m[20, 33] = True          # a lone pixel at (x=33, y=20)
    return m


def test_box_from_mask_is_tight_half_open_xyxy() -> None:
    box = box_from_mask(_mask())
    assert box.dtype == np.float32 and box.tolist() == [8.0, 5.0, 34.0, 21.0]  # one past the last col/row
    one = np.zeros((7, 9), np.uint8)
    one[5, 3] = 255
    assert box_from_mask(one).tolist() == [3.0, 5.0, 4.0, 6.0]
    assert box_from_mask(one[None]).tolist() == [3.0, 5.0, 4.0, 6.0]  # (1, H, W) accepted
    corner = np.zeros((7, 9), bool)
    corner[6, 8] = True  # the last pixel: the box ends on the image border and is still valid
    assert validate_box(box_from_mask(corner), corner.shape).tolist() == [8.0, 6.0, 9.0, 7.0]
    with pytest.raises(ImedsamError, match="empty"):
        box_from_mask(np.zeros((4, 4)))


def test_validate_box() -> None:
    assert validate_box([0, 0, 40, 30], (30, 40)).tolist() == [0, 0, 40, 30]  # half-open: x_max may be W
    with pytest.raises(ImedsamError, match="outside the image"):
        validate_box([0, 0, 41, 29], (30, 40))
    with pytest.raises(ImedsamError, match="xyxy"):
        validate_box([10, 0, 5, 29], (30, 40))


def test_jitter_expand_within_bounds_and_clipped() -> None:
    box = np.array([8, 5, 20, 12], np.float32)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        j = jitter_box(box, (30, 40), rng=rng, expand=(0, 20))
        # never shrinks, grows by 0..19 px per side, clipped to [0, W] x [0, H]
        assert j[0] <= 8 and j[1] <= 5 and j[2] >= 20 and j[3] >= 12
        assert j[0] >= max(0, 8 - 19) and j[1] >= 0 and j[2] <= min(40, 20 + 19) and j[3] <= 30
        assert np.all(j == np.round(j))
        seen.add(float(8 - j[0]))
    assert seen == {float(v) for v in range(0, 9)}  # left side: 0..19 px, clipped at x = 0 (8 px room)
    far = jitter_box(np.array([30, 20, 35, 25]), (30, 40), rng=np.random.default_rng(1), expand=(19, 20))
    assert far.tolist() == [11.0, 1.0, 40.0, 30.0]


def test_jitter_seeded_reproducible() -> None:
    box = np.array([8, 5, 19, 11])
    a = [jitter_box(box, (30, 40), rng=np.random.default_rng(7), mode="both").tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(7)
    draws = {tuple(jitter_box(box, (30, 40), rng=rng).tolist()) for _ in range(10)}
    assert len(draws) > 1


def test_jitter_shift_and_fraction() -> None:
    box = np.array([10, 10, 30, 20], np.float32)  # 20 x 10 px
    rng = np.random.default_rng(3)
    for _ in range(200):
        j = jitter_box(box, (30, 40), rng=rng, mode="shift", shift=5)
        d = j - box
        assert d[0] == d[2] and d[1] == d[3]  # same offset on both corners
        assert -5 <= d[0] < 5 and -5 <= d[1] < 5
    small = np.array([10, 10, 14, 12], np.float32)  # 4 x 2 px: shift capped at floor(0.5 * 2) = 1
    for _ in range(50):
        d = jitter_box(small, (30, 40), rng=rng, mode="shift", shift=5) - small
        assert -1 <= d[0] < 1 and -1 <= d[1] < 1
    for _ in range(100):
        j = jitter_box(box, (100, 100), rng=rng, expand=(0.0, 0.1), unit="fraction")
        assert 0 <= box[0] - j[0] <= 2.0 + 1e-5 and 0 <= box[1] - j[1] <= 1.0 + 1e-5
    with pytest.raises(ImedsamError, match="mode"):
        jitter_box(box, (30, 40), rng=rng, mode="grow")
    with pytest.raises(ImedsamError, match="outside the image"):
        jitter_box(np.array([0, 0, 50, 5]), (30, 40), rng=rng)


def test_sample_points_in_the_right_regions() -> None:
    m = _mask()
    pts, labels = sample_points(m, 4, 6, np.random.default_rng(0))
    assert pts.shape == (10, 2) and pts.dtype == np.float32 and labels.tolist() == [1] * 4 + [0] * 6
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert m[y[:4], x[:4]].all() and not m[y[4:], x[4:]].any()
    assert len({tuple(p) for p in pts[:4].tolist()}) == 4  # without replacement
    again, _ = sample_points(m, 4, 6, np.random.default_rng(0))
    assert np.array_equal(pts, again)
    single = np.zeros((5, 8), bool)
    single[1, 6] = True
    p, _ = sample_points(single, 1, 0, np.random.default_rng(0))
    assert p.tolist() == [[6.0, 1.0]]  # (x, y)
    with pytest.raises(ImedsamError, match="no foreground"):
        sample_points(np.zeros((4, 4)), 1, 0, np.random.default_rng(0))


def test_clicks_from_error_labels_and_region() -> None:
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[5:15, 8:18] = True  # misses cols 5..7 (false negatives), adds cols 15..17 (false positives)
    pts, labels = clicks_from_error(pred, gt, 200, np.random.default_rng(0))
    assert pts.shape == (200, 2) and labels.shape == (200,) and labels.dtype == np.int64
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert np.all(pred[y, x] != gt[y, x])
    assert np.all(labels == gt[y, x])  # 1 on false negatives, 0 on false positives
    assert np.all((x < 8) == (labels == 1)) and 0 < labels.sum() < 200
    again = clicks_from_error(pred, gt, 200, np.random.default_rng(0))
    assert np.array_equal(pts, again[0]) and np.array_equal(labels, again[1])
    distinct, _ = clicks_from_error(pred, gt, 100, np.random.default_rng(0), replace=False)
    assert distinct.shape == (60, 2) and len({tuple(p) for p in distinct.tolist()}) == 60  # 60 error pixels


def test_clicks_from_error_no_error_and_bad_shapes() -> None:
    gt = np.zeros((6, 6), bool)
    gt[1:3, 1:3] = True
    pts, labels = clicks_from_error(gt.copy(), gt, 5, np.random.default_rng(0))
    assert pts.shape == (0, 2) and labels.shape == (0,)
    with pytest.raises(ImedsamError, match="shapes differ"):
        clicks_from_error(np.zeros((6, 7)), gt, 1, np.random.default_rng(0))
