"""Prompted segmentation of a 3D volume, slice by slice, with any promptable 2D system: how 3D prompts become
slice prompts, propagation, and the driver (the 2D prediction is a callable, so inference and evaluation share it).

Coordinates
-----------
Prompts are VOXEL INDICES along the file's first, second and third axes, ``(i, j, k)``, as nibabel and
ITK-SNAP count them (``Sample.array`` is ``(D, H, W) = (k, j, i)``, see :mod:`imedsam.io.volumes`):

* ``box3d = (i0, j0, k0, i1, j1, k1)``, half-open like the 2D boxes (``i1`` one past the last voxel);
* points ``(i, j, k, label)``, label 1 foreground / 0 background; a point prompts the slice it lies on.

Slices are taken across one file axis (``axis``: ``"k"``, the default, is axial for most CT/MR NIfTI files;
``"j"``, ``"i"``). Inside a slice, x runs along the remaining file axis with the lower index and y along the other
(axis k: x = i, y = j; axis j: x = i, y = k; axis i: x = j, y = k), which is how the slice's 2D image is laid out
(rows = y).

Modes
-----
* every slice of ``box3d``'s range is prompted with the box's 2D extent (plus the points on that slice);
* ``propagate``: only the start slice (the slice of the first foreground point, else the middle slice of
  ``box3d``) is prompted as given (its box and points); each next slice, up and down, is prompted with the
  bounding box of the previous slice's mask (MedSAM's 3-D protocol), until a mask vanishes or the box's range
  ends (the whole volume for a box one slice thick, or without a box).

Only prompted slices are encoded, one at a time: memory is the volume, its uint8 display copy, the output, and
one slice's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imedsam.errors import ImedsamError

#: file index axis name -> array axis of ``Sample.array`` (D, H, W) = (k, j, i)
AXES: dict[str, int] = {"k": 0, "j": 1, "i": 2}
_FILE_INDEX = {"i": 0, "j": 1, "k": 2}  # position of each axis in (i, j, k) prompts


@dataclass(frozen=True)
class SliceFrame:
    """How a slice across ``axis`` maps (i, j, k) prompts to 2D (x, y) prompts on slice ``s``."""

    axis: str

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ImedsamError(f"--axis: {self.axis!r}; use i, j or k (the file's first, second or third axis)")

    @property
    def array_axis(self) -> int:
        return AXES[self.axis]

    @property
    def xy(self) -> tuple[int, int]:
        """Positions in an (i, j, k) triple of the slice's x and y."""
        rest = [a for a in "ijk" if a != self.axis]
        return _FILE_INDEX[rest[0]], _FILE_INDEX[rest[1]]

    @property
    def s(self) -> int:
        return _FILE_INDEX[self.axis]

    def take(self, volume: np.ndarray, index: int) -> np.ndarray:
        """The (rows = y, cols = x) 2D slice ``index`` of a (k, j, i) array (a view)."""
        return np.take(volume, index, axis=self.array_axis)

    def put(self, volume: np.ndarray, index: int, plane: np.ndarray) -> None:
        sl = [slice(None)] * 3
        sl[self.array_axis] = index
        volume[tuple(sl)] = plane


@dataclass(frozen=True)
class VolumePrompt:
    """Prompts of one object in a volume (file index coordinates, see the module docstring).

    Attributes:
        box3d: (i0, j0, k0, i1, j1, k1) half-open, or None.
        points: (N, 4) rows (i, j, k, label), or None.
        propagate: prompt one start slice and follow the mask through the neighbours.
    """

    box3d: tuple[float, ...] | None = None
    points: np.ndarray | None = None
    propagate: bool = False


def check_volume_prompt(prompt: VolumePrompt, shape_dhw: tuple[int, int, int]) -> None:
    """Refuse prompts outside the volume or degenerate boxes, in one line, before any model work."""
    size_ijk = (shape_dhw[2], shape_dhw[1], shape_dhw[0])
    dims = "x".join(str(n) for n in size_ijk)
    if prompt.box3d is None and prompt.points is None:
        raise ImedsamError("no prompt given for the volume: pass --box3d I0 J0 K0 I1 J1 K1 and/or --point I J K "
                           "LABEL (voxel indices along the file's axes)")
    if prompt.box3d is not None:
        b = np.asarray(prompt.box3d, dtype=np.float64).reshape(-1)
        if b.size != 6 or not np.all(np.isfinite(b)):
            raise ImedsamError(f"--box3d: expected 6 numbers I0 J0 K0 I1 J1 K1, got {b.tolist()}")
        lo, hi = b[:3], b[3:]
        if not np.all(hi > lo):
            raise ImedsamError(f"--box3d: degenerate box {b.tolist()}: need I0 < I1, J0 < J1 and K0 < K1 (the "
                               "ends one past the last voxel)")
        if np.any(hi <= 0) or np.any(lo >= np.asarray(size_ijk)):
            raise ImedsamError(f"--box3d: box {b.tolist()} lies outside the {dims} (IxJxK) volume")
    if prompt.points is not None:
        p = np.asarray(prompt.points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 4:
            raise ImedsamError("--point: a volume takes 4 values per point, I J K LABEL")
        if not np.all(np.isin(p[:, 3], (0, 1))):
            raise ImedsamError(f"--point: LABEL must be 1 (foreground) or 0 (background), got {p[:, 3].tolist()}")
        inside = np.all((p[:, :3] >= 0) & (p[:, :3] < np.asarray(size_ijk)), axis=1)
        if not inside.all():
            raise ImedsamError(f"--point: point {p[~inside][0, :3].tolist()} lies outside the {dims} (IxJxK) "
                               "volume")
    if prompt.propagate and prompt.box3d is None and (prompt.points is None or not (prompt.points[:, 3] == 1).any()):
        raise ImedsamError("--propagate: needs a --box3d or a foreground --point to start from")


def box_slices(prompt: VolumePrompt, frame: SliceFrame, n_slices: int) -> tuple[int, int]:
    """[first, last + 1) slices of the box's own extent across the axis (every slice without a box)."""
    if prompt.box3d is None:
        return 0, n_slices
    lo, hi = prompt.box3d[frame.s], prompt.box3d[3 + frame.s]
    return max(0, int(np.floor(lo))), min(n_slices, int(np.ceil(hi)))


def slice_range(prompt: VolumePrompt, frame: SliceFrame, n_slices: int) -> tuple[int, int]:
    """[first, last + 1) slices the object may occupy: the box's extent across the axis, else every slice (also
    when propagating from a box one slice thick: a 2D box on one slice, followed as far as the mask goes)."""
    lo, hi = box_slices(prompt, frame, n_slices)
    if prompt.propagate and hi - lo == 1:
        return 0, n_slices
    return lo, hi


def slice_box(prompt: VolumePrompt, frame: SliceFrame) -> list[float] | None:
    """The box's 2D (x0, y0, x1, y1) on any slice of its range."""
    if prompt.box3d is None:
        return None
    b = prompt.box3d
    x, y = frame.xy
    return [float(b[x]), float(b[y]), float(b[3 + x]), float(b[3 + y])]


def slice_points(prompt: VolumePrompt, frame: SliceFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Slice index -> ((N, 2) xy of the points on it, (N,) labels)."""
    if prompt.points is None:
        return {}
    p = np.asarray(prompt.points, dtype=np.float64)
    x, y = frame.xy
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for s in sorted({int(v) for v in p[:, frame.s]}):
        rows = p[p[:, frame.s].astype(int) == s]
        # a voxel index v covers [v, v + 1): its centre is v + 0.5 in the 2D pixel convention
        out[s] = (rows[:, [x, y]] + 0.5, rows[:, 3].astype(np.int64))
    return out


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight half-open (x0, y0, x1, y1) box of a 2D mask, None when it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]



def volume_box(mask: np.ndarray) -> tuple[float, ...] | None:
    """Tight half-open 3-D box ``(i0, j0, k0, i1, j1, k1)`` of a ``(D, H, W) = (k, j, i)`` mask (the order of
    ``--box3d``), None when it is empty."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ImedsamError(f"volume_box: expected a (D, H, W) mask, got shape {m.shape}")
    if not m.any():
        return None
    k = np.flatnonzero(m.any(axis=(1, 2)))
    j = np.flatnonzero(m.any(axis=(0, 2)))
    i = np.flatnonzero(m.any(axis=(0, 1)))
    return (float(i[0]), float(j[0]), float(k[0]), float(i[-1] + 1), float(j[-1] + 1), float(k[-1] + 1))

#: predict(slice index, box or None, points or None, labels or None) -> (H, W) bool mask of that slice
SlicePredictor = Callable[[int, "list[float] | None", "np.ndarray | None", "np.ndarray | None"], np.ndarray]


def propagate(predict: SlicePredictor, start: int, start_mask: np.ndarray, lo: int,
              hi: int) -> dict[int, np.ndarray]:
    """Follow a mask from slice ``start`` to its neighbours in ``[lo, hi)``, each slice prompted with the bounding
    box of the previous slice's mask; a direction stops at the first empty mask (kept, empty) or at the range's
    end. Returns slice -> mask for every slice visited, the start included."""
    masks = {start: start_mask}
    for step in (1, -1):
        previous = start_mask
        s = start + step
        while lo <= s < hi:
            box = mask_box(previous)
            if box is None:
                break
            masks[s] = previous = predict(s, box, None, None)
            s += step
    return masks


def plan_slices(prompt: VolumePrompt, frame: SliceFrame, n_slices: int) -> list[int]:
    """Slices prompted directly (without propagation): the box's range, and every slice holding a point."""
    lo, hi = slice_range(prompt, frame, n_slices)
    slices = set(range(lo, hi)) if prompt.box3d is not None else set()
    slices.update(slice_points(prompt, frame))
    return sorted(slices)


def segment_volume(predict: SlicePredictor, shape_dhw: tuple[int, int, int], prompt: VolumePrompt,
                   frame: SliceFrame, on_slice: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Segment one object: returns a bool (D, H, W) mask on the volume's grid.

    Args:
        predict: 2D prediction of one slice from a box and/or points (slice pixel coordinates); it is called
            once per prompted slice, in slice order (propagation: outwards from the start slice).
        shape_dhw: the volume's array shape.
        prompt: the object's prompts, already checked (:func:`check_volume_prompt`).
        frame: the slicing axis.
        on_slice: called after each slice is predicted (e.g. to advance a progress bar).
    """
    out = np.zeros(shape_dhw, dtype=bool)
    n = shape_dhw[frame.array_axis]
    box = slice_box(prompt, frame)
    points = slice_points(prompt, frame)
    lo, hi = slice_range(prompt, frame, n)

    def run(s: int, b, pts, labels) -> np.ndarray:
        mask = predict(s, b, pts, labels)
        if on_slice is not None:
            on_slice(s, mask)
        return mask

    if not prompt.propagate:
        for s in plan_slices(prompt, frame, n):
            pts, labels = points.get(s, (None, None))
            frame.put(out, s, run(s, box if lo <= s < hi else None, pts, labels))
        return out
    foreground = [s for s, (_, labels) in points.items() if (labels == 1).any() and lo <= s < hi]
    box_lo, box_hi = box_slices(prompt, frame, n)
    start = foreground[0] if foreground else (box_lo + box_hi - 1) // 2
    pts, labels = points.get(start, (None, None))
    first = run(start, box, pts, labels)
    for s, mask in propagate(lambda *a: run(*a), start, first, lo, hi).items():
        frame.put(out, s, mask)
    return out


def planned_slices(prompt: VolumePrompt, frame: SliceFrame, shape_dhw: tuple[int, int, int]) -> int:
    """How many slices :func:`segment_volume` predicts at most (the length of a progress bar)."""
    n = shape_dhw[frame.array_axis]
    if prompt.propagate:
        lo, hi = slice_range(prompt, frame, n)
        return hi - lo
    return len(plan_slices(prompt, frame, n))
