"""Metrics on analytic shapes (discs, spheres, shifted squares) and the explicit empty-mask policy."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.evaluate.metrics import (METRIC_KEYS, MetricAccumulator, binary_metrics, conventions,
                                      multiclass_metrics, summarize)


def disc(n: int, r: float, center: tuple[float, float] | None = None) -> np.ndarray:
    cy, cx = center if center is not None else ((n - 1) / 2, (n - 1) / 2)
    y, x = np.mgrid[:n, :n]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def sphere(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    idx = np.indices(shape).astype(np.float64)
    return sum(((idx[i] - (shape[i] - 1) / 2) * spacing[i]) ** 2 for i in range(3)) <= radius_mm ** 2


def square(n: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=bool)
    m[top:top + side, left:left + side] = True
    return m


# ----------------------------------------------------------------------------------------------- overlap metrics

@pytest.mark.parametrize("r,d", [(20, 5), (30, 2), (15, 8)])
def test_dice_iou_of_concentric_discs_match_analytic(r, d):
    m = binary_metrics(disc(96, r), disc(96, r + d))
    dice = 2 * r * r / (r * r + (r + d) ** 2)
    iou = r * r / (r + d) ** 2
    assert m["dice"] == pytest.approx(dice, abs=0.01)
    assert m["iou"] == pytest.approx(iou, abs=0.01)
    assert m["iou"] == pytest.approx(m["dice"] / (2 - m["dice"]), rel=1e-12)  # exact identity


def test_identical_masks_are_perfect():
    a = disc(48, 12)
    assert binary_metrics(a, a) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}


def test_returns_plain_floats_in_documented_keys():
    m = binary_metrics(disc(32, 8), disc(32, 9))
    assert tuple(m) == METRIC_KEYS
    assert all(type(v) is float for v in m.values())
    json.dumps(m)


# ----------------------------------------------------------------------------------------------- distances

def test_hd_of_concentric_discs_is_radius_difference():
    m = binary_metrics(disc(64, 10), disc(64, 13))
    assert m["hd"] == pytest.approx(3.0, abs=1.0)
    assert m["hd95"] <= m["hd"] + 1e-9


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shifted_square_has_hd_exactly_k(k):
    gt = square(64, 20, 20, 20)
    pred = square(64, 20, 20 + k, 20)
    m = binary_metrics(pred, gt)
    assert m["hd"] == pytest.approx(k, abs=1e-6)
    # spacing on the shift axis scales HD exactly; spacing on the other axis does not matter
    assert binary_metrics(pred, gt, spacing=(3.0, 0.4))["hd"] == pytest.approx(0.4 * k, abs=1e-6)
    assert binary_metrics(pred, gt, spacing=(0.4, 3.0))["hd"] == pytest.approx(3.0 * k, abs=1e-5)


def test_isotropic_spacing_scales_all_distances():
    pred, gt = disc(64, 10, (30, 31)), disc(64, 14, (32, 30))
    px = binary_metrics(pred, gt, nsd_tolerance=2.0)
    mm = binary_metrics(pred, gt, spacing=(0.7, 0.7), nsd_tolerance=1.4)
    for key in ("hd", "hd95"):
        assert mm[key] == pytest.approx(0.7 * px[key], rel=1e-5)
    assert mm["nsd"] == pytest.approx(px["nsd"], abs=1e-6)  # the tolerance scaled too
    assert mm["dice"] == px["dice"]
    assert binary_metrics(pred, gt, spacing=0.7)["hd"] == pytest.approx(mm["hd"])  # scalar = isotropic


def test_sphere_with_anisotropic_spacing_hd_in_mm():
    spacing = (2.0, 0.5, 0.5)
    shape = (15, 56, 56)
    inner, outer = sphere(shape, spacing, 8.0), sphere(shape, spacing, 11.0)
    m = binary_metrics(inner, outer, spacing=spacing)
    # radius difference 3 mm, discretised at up to 2 mm per voxel along the first axis
    assert m["hd"] == pytest.approx(3.0, abs=0.6 * max(spacing))
    assert m["hd95"] <= m["hd"] + 1e-9
    # without spacing the same masks are measured in voxels: in-plane 6 voxels, far from 3 mm
    assert binary_metrics(inner, outer)["hd"] >= 5.0


def test_nsd_within_and_beyond_tolerance():
    gt = disc(64, 15)
    assert binary_metrics(disc(64, 16), gt, nsd_tolerance=2.0)["nsd"] == 1.0
    far = binary_metrics(disc(64, 20), gt, nsd_tolerance=2.0)["nsd"]
    assert 0.0 <= far < 1.0
    assert binary_metrics(disc(64, 20), gt, nsd_tolerance=6.0)["nsd"] == 1.0
    # the tolerance is in mm when spacing is given
    assert binary_metrics(disc(64, 16), gt, spacing=(3.0, 3.0), nsd_tolerance=2.0)["nsd"] < 1.0


def test_hd95_below_hd_with_outlier():
    gt = square(64, 10, 10, 30)
    pred = gt.copy()
    pred[60, 60] = True  # one far-away false-positive pixel
    m = binary_metrics(pred, gt)
    assert m["hd"] == pytest.approx(math.hypot(60 - 39, 60 - 39), abs=1e-5)
    assert m["hd95"] == 0.0


def test_parity_with_monai_public_functions():
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

    rng = np.random.default_rng(0)
    pred = disc(48, 12, (22, 25)) | (rng.random((48, 48)) > 0.995)
    gt = disc(48, 14, (24, 23))
    spacing = (0.8, 1.3)
    m = binary_metrics(pred, gt, spacing=spacing, nsd_tolerance=1.5)
    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(gt)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, g, include_background=True, spacing=spacing)
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(p, g, [1.5], include_background=True, spacing=spacing)
    assert m["hd"] == pytest.approx(float(hd), rel=1e-5)
    assert m["hd95"] == pytest.approx(float(hd95), rel=1e-5)
    assert m["nsd"] == pytest.approx(float(nsd), rel=1e-5)
    assert m["dice"] == pytest.approx(float(compute_dice(p, g, include_background=True)), rel=1e-6)
    assert m["iou"] == pytest.approx(float(compute_iou(p, g, include_background=True)), rel=1e-6)


# ----------------------------------------------------------------------------------------------- empty masks

def test_both_empty_policy():
    z = np.zeros((16, 16), bool)
    assert binary_metrics(z, z) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}


@pytest.mark.parametrize("which", ["pred", "gt"])
def test_one_empty_default_is_nan_distances(which):
    a, z = disc(32, 6), np.zeros((32, 32), bool)
    pred, gt = (z, a) if which == "pred" else (a, z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI empty-mask warnings leak out
        m = binary_metrics(pred, gt)
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["nsd"] == 0.0
    assert math.isnan(m["hd"]) and math.isnan(m["hd95"])


def test_one_empty_sentinel_and_diagonal():
    a, z = disc(30, 6), np.zeros((30, 40), bool)
    a = np.pad(a, ((0, 0), (0, 10)))
    assert binary_metrics(z, a, empty_policy=100.0)["hd"] == 100.0
    assert binary_metrics(z, a, empty_policy="diagonal")["hd95"] == pytest.approx(50.0)
    assert binary_metrics(z, a, spacing=(2.0, 2.0), empty_policy="diagonal")["hd"] == pytest.approx(100.0)


def test_summarize_excludes_and_counts_nans():
    z = np.zeros((32, 32), bool)
    rows = [binary_metrics(disc(32, 8), disc(32, 9)), binary_metrics(z, disc(32, 5)), binary_metrics(z, z)]
    s = summarize(rows)
    assert set(s) == set(METRIC_KEYS)
    assert s["hd"]["n"] == 3 and s["hd"]["n_nan"] == 1 and s["hd"]["n_valid"] == 2
    assert s["hd"]["mean"] == pytest.approx((rows[0]["hd"] + 0.0) / 2)
    assert s["dice"]["n_nan"] == 0
    assert s["dice"]["mean"] == pytest.approx((rows[0]["dice"] + 0 + 1) / 3)
    assert s["dice"]["median"] == pytest.approx(rows[0]["dice"])
    assert s["dice"]["std"] == pytest.approx(float(np.std([rows[0]["dice"], 0, 1], ddof=1)))
    json.dumps(s, allow_nan=False)
    all_nan = summarize([{"hd": float("nan")}, {"hd": None}])
    assert all_nan["hd"]["mean"] is None and all_nan["hd"]["n_nan"] == 2
    assert summarize([{"case": "a", "dice": 0.5, "grid": "8x8"}])["dice"]["std"] == 0.0


# ----------------------------------------------------------------------------------------------- 3-D, multiclass, class

def test_volume_metrics_and_multiclass():
    labels_gt = np.zeros((6, 32, 32), np.int64)
    labels_gt[:, 4:14, 4:14] = 1
    labels_gt[:, 18:28, 18:28] = 2
    labels_pred = labels_gt.copy()
    labels_pred[:, 18:28, 20:30] = 0
    labels_pred[:, 18:28, 20:30] = 2
    labels_pred[:, 18:28, 18:20] = 0
    out = multiclass_metrics(labels_pred, labels_gt, [1, 2, 3], spacing=(3.0, 1.0, 1.0))
    assert list(out) == [1, 2, 3]
    assert out[1]["dice"] == 1.0 and out[1]["hd"] == 0.0
    assert out[2]["hd"] == pytest.approx(2.0)  # shifted by 2 voxels of 1 mm
    assert out[2]["dice"] == pytest.approx(0.8)
    assert out[3] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}  # absent from both


def test_accumulator():
    acc = MetricAccumulator(nsd_tolerance=1.0)
    acc.update(disc(32, 8), disc(32, 9), case="a", grid="32x32")
    acc.update(np.zeros((32, 32), bool), disc(32, 9), case="b", spacing=(0.5, 0.5))
    assert len(acc) == 2 and acc.rows[0]["case"] == "a" and acc.rows[0]["grid"] == "32x32"
    assert acc.summary()["hd"]["n_nan"] == 1
    assert "mm" in acc.conventions()["distance_unit"]
    acc.reset()
    assert len(acc) == 0


def test_conventions_text():
    c = conventions()
    assert "pixels" in c["distance_unit"] and "max of the two directed 95th percentiles" in c["hd95"]
    assert "NaN" in c["empty_one"]
    assert "mm" in conventions(spacing=(1.0, 1.0), empty_policy=100)["nsd_tolerance"]
    assert "100" in conventions(empty_policy=100)["empty_one"]


# ----------------------------------------------------------------------------------------------- user errors

@pytest.mark.parametrize("kwargs,match", [
    ({"pred": np.zeros((4, 4), bool), "gt": np.zeros((4, 5), bool)}, "same grid"),
    ({"pred": np.zeros(4, bool), "gt": np.zeros(4, bool)}, r"\(H, W\)"),
    ({"pred": np.full((4, 4), 0.3), "gt": np.zeros((4, 4))}, "threshold"),
    ({"pred": np.zeros((4, 4), bool), "gt": np.zeros((4, 4), bool), "spacing": (1.0,)}, "spacing"),
    ({"pred": np.zeros((4, 4), bool), "gt": np.zeros((4, 4), bool), "spacing": (1.0, -1.0)}, "spacing"),
    ({"pred": np.zeros((4, 4), bool), "gt": np.zeros((4, 4), bool), "nsd_tolerance": -1}, "nsd_tolerance"),
    ({"pred": np.zeros((4, 4), bool), "gt": np.zeros((4, 4), bool), "empty_policy": "zero"}, "empty_policy"),
])
def test_user_errors(kwargs, match):
    with pytest.raises(ImedsamError, match=match):
        binary_metrics(**kwargs)


def test_accepts_01_numbers_and_tensors():
    a = disc(24, 6)
    ref = binary_metrics(a, disc(24, 7))
    assert binary_metrics(a.astype(np.uint8), torch.from_numpy(disc(24, 7)).float()) == ref
