"""Flip test-time augmentation: prompt geometry, the averaged prediction, and the evaluation path."""

import numpy as np
import pytest
import torch

from imedsam.data.prompts import box_from_mask
from imedsam.errors import ImedsamError
from imedsam.evaluate.protocol import EvalCase, predict_case
from imedsam.infer.segmenter import Segmenter
from imedsam.models.views import FlipView, parse_tta
from imedsam.models.imedsam import IMedSAM


def test_parse_tta():
    assert [v.name for v in parse_tta(None)] == ["id"]
    assert [v.name for v in parse_tta("none")] == ["id"]
    assert [v.name for v in parse_tta("h, v")] == ["id", "h", "v"]
    assert [v.axes for v in parse_tta("hv")] == [(), (0, 1)]
    for bad in ("x", "h,h", "h;v"):
        with pytest.raises(ImedsamError, match="--tta"):
            parse_tta(bad)


@pytest.mark.parametrize("spec", ["h", "v", "hv"])
def test_flipped_prompts_land_on_the_flipped_pixels(spec):
    view = parse_tta(spec)[1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((13, 17), bool)
        y0, x0 = rng.integers(0, 12), rng.integers(0, 16)
        mask[y0:rng.integers(y0 + 1, 14), x0:rng.integers(x0 + 1, 18)] = True
        flipped = view.image(mask)
        np.testing.assert_array_equal(view.box(box_from_mask(mask), mask.shape), box_from_mask(flipped))
        ys, xs = np.nonzero(mask)
        moved = view.points(np.stack([xs, ys], 1), mask.shape).astype(int)
        assert flipped[moved[:, 1], moved[:, 0]].all()
        assert view.points(moved, mask.shape).astype(int).tolist() == np.stack([xs, ys], 1).tolist()
        np.testing.assert_array_equal(view.restore(torch.from_numpy(flipped)).numpy(), mask)


@pytest.fixture(scope="module", params=[("tiny_tinyvit_test", {}), ("imedsam", {"backbone": "tiny_tinyvit_test"})],
                ids=["sam-decoder", "implicit-decoder"])
def system(request):
    torch.manual_seed(0)
    name, options = request.param
    return Segmenter(name, device="cpu", precision="fp32", **options).system


def test_segmenter_averages_the_logits_of_the_flipped_views(system):
    image = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    box, points, labels = np.array([5, 6, 30, 25]), np.array([[12, 14], [40, 30]]), np.array([1, 0])
    plain = Segmenter(system, device="cpu", precision="fp32")
    tta = Segmenter(system, device="cpu", precision="fp32", tta="h,v")
    tta.set_image(image)
    implicit = isinstance(system, IMedSAM)  # only the implicit decoder has an uncertainty map
    got = tta.predict(box=box, points=points, point_labels=labels, size=(19, 29), uncertainty=implicit)
    expected, expected_unc = [], []
    for view in parse_tta("h,v"):
        plain.set_image(view.image(image))
        pred = plain.predict(box=view.box(box, image.shape[:2]), points=view.points(points, image.shape[:2]),
                             point_labels=labels, size=(19, 29), uncertainty=implicit)
        expected.append(view.restore(torch.from_numpy(pred.logits)).numpy())
        if implicit:
            expected_unc.append(view.restore(torch.from_numpy(pred.uncertainty)).numpy())
    np.testing.assert_allclose(got.logits, np.mean(expected, axis=0), rtol=1e-5, atol=1e-5)
    if implicit:  # the uncertainty map is the mean of the views' maps too
        assert got.uncertainty.shape == (19, 29) and got.uncertainty.max() > 0
        np.testing.assert_allclose(got.uncertainty, np.mean(expected_unc, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.masks, got.logits > 0)
    assert got.low_res_logits is None  # a mean of flipped views is no single view's mask_input
    plain.set_image(image)
    assert not np.allclose(got.logits, plain.predict(box=box, points=points, point_labels=labels,
                                                     size=(19, 29)).logits)
    with pytest.raises(ImedsamError, match="mask_input"):
        tta.predict(box=box, mask_input=np.zeros((64, 64), np.float32))


def test_evaluation_with_flips_matches_the_segmenter(system):
    rng = np.random.default_rng(2)
    gt = np.zeros((40, 48), bool)
    gt[8:25, 10:37] = True
    case = EvalCase("c", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), gt)
    views = parse_tta("h,hv")
    preds = predict_case(system, case, size=[None, (20, 24)], device=torch.device("cpu"), views=views)
    seg = Segmenter(system, device="cpu", precision="fp32", tta="h,hv")
    seg.set_image(case.image)
    for pred, size in zip(preds, [None, (20, 24)]):
        np.testing.assert_array_equal(pred, seg.predict(box=box_from_mask(gt), size=size).masks[0])
    one = predict_case(system, case, size=None, device=torch.device("cpu"), views=(FlipView(),))
    seg_plain = Segmenter(system, device="cpu", precision="fp32")
    seg_plain.set_image(case.image)
    np.testing.assert_array_equal(one, seg_plain.predict(box=box_from_mask(gt)).masks[0])
