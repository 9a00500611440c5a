"""imedsam.io.slicing: a volume seen across each file axis is laid out as SliceFrame lays out its slices, ``back``
undoes it exactly, and a 3-D box moves with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imedsam.data.volume_prompts import SliceFrame
from imedsam.errors import ImedsamError
from imedsam.io.slicing import across, back, box_across, check_axes


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_across_lays_slices_out_as_slice_frame_and_back_inverts(axis):
    vol = np.random.default_rng(0).integers(0, 255, size=(4, 5, 6)).astype(np.uint8)  # (k, j, i), all distinct
    moved = across(vol, axis)
    frame = SliceFrame(axis)
    assert moved.shape[0] == vol.shape[frame.array_axis]
    for s in range(moved.shape[0]):
        assert np.array_equal(moved[s], frame.take(vol, s))
    assert np.array_equal(back(moved, axis), vol)
    t = torch.from_numpy(vol)
    assert torch.equal(back(across(t, axis), axis), t)
    probs = torch.stack([across(t, axis), across(t, axis) + 1])  # a leading class dimension is kept in front
    assert torch.equal(back(probs, axis), torch.stack([t, t + 1]))


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_a_box_moves_with_the_volume(axis):
    vol = np.zeros((6, 7, 8), np.uint8)  # (k, j, i)
    i0, j0, k0, i1, j1, k1 = 1, 2, 3, 5, 6, 5
    vol[k0:k1, j0:j1, i0:i1] = 1
    c0, r0, s0, c1, r1, s1 = (int(v) for v in box_across((i0, j0, k0, i1, j1, k1), axis))
    moved = across(vol, axis)
    inside = np.zeros_like(moved)
    inside[s0:s1, r0:r1, c0:c1] = 1
    assert np.array_equal(moved, inside)


def test_check_axes_refuses_unknown_and_repeated_axes():
    assert check_axes(["k", "j", "i"]) == ("k", "j", "i")
    for bad in (["x"], ["k", "k"], []):
        with pytest.raises(ImedsamError, match="--stack-axes: .* distinct file axes among k, j, i"):
            check_axes(bad)
