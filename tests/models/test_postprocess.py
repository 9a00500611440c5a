"""Small-component removal on analytic masks."""

import numpy as np
import pytest

from imedsam.errors import ImedsamError
from imedsam.models.postprocess import count_components, remove_small_components


def scene() -> np.ndarray:
    """A 9x9 square (81 px), a diagonal 3-pixel speck (one 8-connected component) and a 2x2 speck (4 px)."""
    m = np.zeros((40, 40), dtype=bool)
    m[5:14, 5:14] = True
    m[30, 30] = m[31, 31] = m[32, 32] = True
    m[20:22, 35:37] = True
    return m


def test_removes_components_below_the_size_only():
    m = scene()
    out = remove_small_components(m, 4)
    assert out[5:14, 5:14].all() and out[20:22, 35:37].all()  # 81 and 4 px kept
    assert not out[30:33, 30:33].any()  # the diagonal speck is one 3-px component: removed
    assert out.sum() == 81 + 4
    assert remove_small_components(m, 5).sum() == 81
    assert remove_small_components(m, 82).sum() == 0


def test_zero_and_one_keep_everything_and_stacks_are_per_mask():
    m = scene()
    np.testing.assert_array_equal(remove_small_components(m, 0), m)
    np.testing.assert_array_equal(remove_small_components(m, 1), m)
    stack = remove_small_components(np.stack([m, np.zeros_like(m)]), 5)
    assert stack.shape == (2, 40, 40) and stack[0].sum() == 81 and stack[1].sum() == 0


def test_bad_size_is_a_user_error():
    with pytest.raises(ImedsamError, match="--min-component"):
        remove_small_components(scene(), -1)


def test_count_components_with_a_size_fraction():
    m = scene()  # components of 81, 3 and 4 px
    assert count_components(m) == 3
    assert count_components(m, 0.04) == 2  # 4 px is 4.5 % of 88: kept; 3 px (3.4 %) is not
    assert count_components(m, 0.05) == 1
    assert count_components(np.zeros((5, 5), bool), 0.05) == 0
    with pytest.raises(ImedsamError, match="count_components"):
        count_components(np.stack([m, m]))


def test_largest_component_keeps_the_biggest_26_connected_blob():
    from imedsam.models.postprocess import largest_component

    m = np.zeros((4, 10, 10), bool)
    m[0:3, 1:5, 1:5] = True  # 48 voxels
    m[3, 8, 8] = True  # 1 voxel, apart
    m[1, 7:9, 0:2] = True  # 4 voxels, apart
    out = largest_component(m)
    assert out.sum() == 48 and out[0:3, 1:5, 1:5].all()
    corner = np.zeros((3, 5, 5), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touching by a corner only: one component in 26-connectivity
    corner[2, 4, 4] = True
    assert largest_component(corner).sum() == 2
    assert not largest_component(np.zeros((2, 3, 3), bool)).any()
    flat = np.zeros((6, 6), bool)
    flat[0, 0] = True
    flat[3:5, 3:6] = True
    assert largest_component(flat).sum() == 6  # 2-D: 8-connected
    with pytest.raises(ImedsamError):
        largest_component(np.zeros(5, bool))


def test_largest_component_per_label_keeps_each_labels_biggest_blob():
    from imedsam.models.postprocess import largest_component_per_label

    labels = np.zeros((3, 8, 8), np.uint8)
    labels[0:2, 0:3, 0:3] = 1  # 18 voxels
    labels[2, 7, 7] = 1  # a speck of label 1
    labels[0, 5:8, 5:8] = 2  # 9 voxels
    labels[2, 0, 7] = 2  # a speck of label 2
    out = largest_component_per_label(labels)
    assert out.dtype == labels.dtype
    assert (out == 1).sum() == 18 and (out == 2).sum() == 9
    assert out[2, 7, 7] == 0 and out[2, 0, 7] == 0
    # the same as labelling every class over the whole volume (the bounding boxes only save work)
    from imedsam.models.postprocess import largest_component

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 5, (6, 20, 20)).astype(np.uint16) * (rng.random((6, 20, 20)) < 0.4)
    naive = np.zeros_like(noisy)
    for value in range(1, 5):
        naive[largest_component(noisy == value)] = value
    np.testing.assert_array_equal(largest_component_per_label(noisy), naive)
