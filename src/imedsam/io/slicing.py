"""A volume array seen across one of its file axes: the array permuted so that the slices come first.

Arrays of volumes are ``(D, H, W) = (k, j, i)`` (:mod:`imedsam.io.volumes`). Slicing across file axis ``a`` gives
the array ``across(volume, a)`` of shape ``(n_a, rows, cols)``, whose slices are laid out as
:class:`imedsam.data.volume_prompts.SliceFrame` lays them out (the remaining file axis with the lower index along
the columns):

* ``k``: ``(k, j, i)``, the array itself;
* ``j``: ``(j, k, i)``: rows = k, columns = i;
* ``i``: ``(i, k, j)``: rows = k, columns = j.

:func:`back` undoes the permutation (leading dimensions, e.g. classes, are kept in front) and :func:`box_across`
moves a half-open ``(i0, j0, k0, i1, j1, k1)`` box into the permuted array's own ``(column, row, slice)`` order,
so that code written for slicing across ``k`` runs unchanged on the other axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from imedsam.errors import ImedsamError

__all__ = ["STACK_AXES", "across", "back", "box_across", "check_axes"]

#: file axis -> the permutation of a (k, j, i) array that puts that axis first (rows, then columns after it)
STACK_AXES: dict[str, tuple[int, int, int]] = {"k": (0, 1, 2), "j": (1, 0, 2), "i": (2, 0, 1)}

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def check_axes(axes: Sequence[str], *, argument: str = "--stack-axes") -> tuple[str, ...]:
    """``axes`` as a tuple of distinct names among k, j, i (at least one); else a one-line error naming
    ``argument``."""
    out = tuple(axes)
    if not out or any(a not in STACK_AXES for a in out) or len(set(out)) != len(out):
        raise ImedsamError(f"{argument}: {','.join(map(str, out)) or '(none)'} is not a list of distinct file "
                           "axes among k, j, i (e.g. k, or k,j,i)")
    return out


def _permute(array: Array, perm: tuple[int, ...]) -> Array:
    return array.permute(*perm) if isinstance(array, torch.Tensor) else np.transpose(array, perm)


def across(volume: Array, axis: str) -> Array:
    """The ``(D, H, W)`` array (numpy or torch; a view) with file axis ``axis``'s slices first (module
    docstring); trailing dimensions beyond three are not allowed."""
    if volume.ndim != 3:
        raise ValueError(f"across: a (D, H, W) volume, got shape {tuple(volume.shape)}")
    return _permute(volume, STACK_AXES[axis])


def back(moved: Array, axis: str) -> Array:
    """Inverse of :func:`across` on the last three dimensions of ``moved`` (``(..., n_a, rows, cols)`` ->
    ``(..., D, H, W)``; a view)."""
    lead = moved.ndim - 3
    inverse = tuple(int(i) for i in np.argsort(STACK_AXES[axis]))
    return _permute(moved, tuple(range(lead)) + tuple(lead + i for i in inverse))


def box_across(box3d: Sequence[float], axis: str) -> tuple[float, ...]:
    """A half-open ``(i0, j0, k0, i1, j1, k1)`` box of the volume -> the same box in the ``(column, row,
    slice)`` order of ``across(volume, axis)`` (itself for ``k``)."""
    b = [float(v) for v in box3d]
    lo = {"i": b[0], "j": b[1], "k": b[2]}
    hi = {"i": b[3], "j": b[4], "k": b[5]}
    order = "kji"  # the array's axes
    slice_axis, row, col = (order[p] for p in STACK_AXES[axis])
    return lo[col], lo[row], lo[slice_axis], hi[col], hi[row], hi[slice_axis]
