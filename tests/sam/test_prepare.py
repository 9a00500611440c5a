import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.sam.prepare import (check_box, check_points, grid_query_coords, prepare_image, resized_shape,
                                   restore_logits, to_input_coords)
from imedsam.sam.model import Preprocess


def _Pre(img_size, normalize):
    return Preprocess(img_size=img_size, normalize=normalize)


def test_resized_shape_follows_sam_rounding():
    assert resized_shape(128, 128, 1024) == (1024, 1024)
    assert resized_shape(300, 500, 256) == (154, 256)  # 300 * 256 / 500 = 153.6 -> 154
    assert resized_shape(1, 3, 16) == (5, 16)


def test_prepare_pads_bottom_right_and_minmax_normalises_valid_region():
    img = np.arange(30 * 50, dtype=np.float32).reshape(30, 50)
    p = prepare_image(img, _Pre(64, "minmax"))
    assert p.tensor.shape == (1, 3, 64, 64)
    assert p.input_size == (38, 64) and p.original_size == (30, 50)
    valid = p.tensor[0, :, :38, :64]
    assert float(valid.min()) == pytest.approx(0.0) and float(valid.max()) == pytest.approx(1.0)
    assert float(p.tensor[0, :, 38:, :].abs().max()) == 0.0


def test_sam_normalisation_uses_pixel_mean_std():
    img = np.full((16, 16, 3), 123.675, dtype=np.float32)
    img[..., 1], img[..., 2] = 116.28, 103.53
    p = prepare_image(img, _Pre(16, "sam"))
    assert float(p.tensor.abs().max()) < 1e-5


def test_coordinate_mapping_is_per_axis_scale():
    p = prepare_image(np.zeros((100, 200), np.float32), _Pre(256, "minmax"))
    assert p.input_size == (128, 256)
    box = to_input_coords(np.array([10.0, 20.0, 110.0, 60.0]), p)
    np.testing.assert_allclose(box, [12.8, 25.6, 140.8, 76.8])
    pts = to_input_coords(np.array([[50.0, 50.0]]), p)
    np.testing.assert_allclose(pts, [[64.0, 64.0]])


def test_restore_crops_padding_before_resizing():
    p = prepare_image(np.zeros((50, 100), np.float32), _Pre(64, "minmax"))  # valid region 32 x 64
    logits = torch.full((1, 1, 16, 16), -10.0)
    logits[..., :8, :] = 10.0  # exactly the valid (top) half
    out = restore_logits(logits, p)
    assert out.shape == (1, 1, 50, 100)
    assert bool((out > 0).all())
    out2 = restore_logits(logits, p, size=(7, 9))
    assert out2.shape == (1, 1, 7, 9)


def test_grid_query_coords_are_pixel_centres_of_the_valid_region():
    p = prepare_image(np.zeros((10, 20), np.float32), _Pre(40, "minmax"))  # valid region 20 x 40
    c = grid_query_coords(p, size=(2, 4))
    assert c.shape == (8, 2)
    # rows: centres at 0.25 and 0.75 of the valid height 20 -> 5 and 15 encoder px -> 2*5/40-1 = -0.75, -0.25
    np.testing.assert_allclose(c[:, 0].reshape(2, 4)[:, 0].numpy(), [-0.75, -0.25], atol=1e-6)
    np.testing.assert_allclose(c[:, 1].reshape(2, 4)[0].numpy(), [-0.75, -0.25, 0.25, 0.75], atol=1e-6)
    one = grid_query_coords(p, size=(1, 1))
    np.testing.assert_allclose(one.numpy(), [[-0.5, 0.0]], atol=1e-6)


def test_normalize_minmax_is_per_image():
    x = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 5.0)])
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 10.0, 7.0
    y = _Pre(4, "minmax").normalize_tensor(x)
    assert float(y[0].max()) == 1.0 and float(y[1].max()) == 1.0 and float(y[1].min()) == 0.0


@pytest.mark.parametrize("box, message", [
    ((10, 10, 5, 20), "degenerate"),
    ((200, 10, 300, 20), "outside"),
    ((1, 2, 3), "4 numbers"),
])
def test_bad_boxes_raise_user_errors(box, message):
    with pytest.raises(ImedsamError, match=message):
        check_box(box, (100, 100))


def test_box_is_clipped_and_points_checked():
    np.testing.assert_allclose(check_box((-5, 10, 150, 20), (100, 100)), [0, 10, 100, 20])
    with pytest.raises(ImedsamError, match="labels must be 1"):
        check_points([[1, 1]], [2], (10, 10))
    with pytest.raises(ImedsamError, match="outside"):
        check_points([[11, 1]], [1], (10, 10))
    pts, labels = check_points([[1, 1], [2, 3]], [1, 0], (10, 10))
    assert labels.tolist() == [1, 0]
