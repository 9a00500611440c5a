"""`Sample`: an array plus the geometry needed to write a prediction back onto the grid it came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError


@dataclass(frozen=True)
class Geometry:
    """Where an array lives in the world.

    World conventions (the readers in ``imedsam.io`` follow them for every format):

    * array axes are (D, H, W) = (slice, row, column) for volumes and (H, W) for images; the *index* axes of
      ITK/NIfTI are the reverse, (x, y, z) = (column, row, slice);
    * ``origin`` and ``direction`` are in the DICOM/ITK patient frame (LPS: x to the patient's left, y to the
      posterior, z to the head), exactly what SimpleITK's ``GetOrigin``/``GetDirection`` return for the file;
    * ``affine`` is in the NIfTI frame (RAS+) and maps ``(x, y, z, 1)`` = ``(column, row, slice, 1)`` to mm,
      i.e. nibabel's ``img.affine``; ``index_to_world`` applies it to indices given in array axis order.

    Attributes:
        shape: spatial shape of the original array, (H, W) for 2D or (D, H, W) for 3D (axis order of ``array``).
        spacing: physical size of one pixel/voxel along each axis of ``shape`` (array order: (dy, dx) or
            (dz, dy, dx)), in mm; ``None`` when unknown (then distances are in pixels and reports say so).
        origin: LPS world position (mm) of the first voxel ``array[0, 0(, 0)]``, 3 values, or ``None``.
        direction: row-major 3x3 direction cosines (9 values, SimpleITK layout: column ``a`` is the LPS unit
            vector of index axis ``a`` in (x, y, z) order), or ``None``. DICOM slices, placed in 3D, have 3x3 too.
        affine: 4x4 RAS+ voxel-to-world matrix (NIfTI convention, index order (x, y, z)), or ``None``.
        slice_index: index along the slicing axis when this 2D sample is a slice of a volume, else ``None``.
        source: the file (or folder, for a DICOM series) the array was read from, or ``None``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None
    slice_index: int | None = None
    source: Path | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def index_to_world(self, index: np.ndarray | list | tuple) -> np.ndarray:
        """World (RAS+, mm) positions of voxel indices given in ARRAY axis order.

        Args:
            index: ``(..., ndim)`` indices, ``(d, h, w)`` for volumes or ``(h, w)`` for images (may be fractional).

        Returns:
            ``(..., 3)`` float64 RAS+ coordinates in mm.

        Raises:
            ValueError: the geometry has no affine.
        """
        if self.affine is None:
            raise ValueError("this geometry has no affine (world position unknown)")
        idx = np.asarray(index, dtype=np.float64)
        if idx.shape[-1] != self.ndim:
            raise ValueError(f"index must end with {self.ndim} coordinates, got shape {idx.shape}")
        xyz = idx[..., ::-1]
        if self.ndim == 2:
            xyz = np.concatenate([xyz, np.zeros(xyz.shape[:-1] + (1,))], axis=-1)
        aff = np.asarray(self.affine, dtype=np.float64)
        return xyz @ aff[:3, :3].T + aff[:3, 3]


@dataclass(frozen=True)
class Sample:
    """An image or volume with its geometry.

    Attributes:
        array: 2D images are (H, W) gray or (H, W, C) with C in {3, 4} (RGB[A]); volumes are (D, H, W).
            Values keep the file's dtype and scale (e.g. CT in Hounsfield units after rescale slope/intercept).
        geometry: the original grid; ``geometry.shape`` equals the spatial part of ``array.shape``.
        meta: free-form extra facts from the reader (modality, window, photometric interpretation...).
    """

    array: np.ndarray
    geometry: Geometry
    meta: dict = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.geometry.ndim == 3

    def with_array(self, array: np.ndarray) -> "Sample":
        """Same geometry, another array (e.g. a predicted mask) of the same spatial shape."""
        spatial = array.shape[: self.geometry.ndim]
        if tuple(spatial) != tuple(self.geometry.shape):
            raise ValueError(f"array shape {array.shape} does not match geometry {self.geometry.shape}")
        return replace(self, array=array)


def require_finite(array, source: str) -> None:
    """Refuse an image or volume with NaN or infinite values, naming ``source`` (a file or argument): models,
    windows and metrics have no meaning for them, and a silent result would look like a real one."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise ImedsamError(f"{source}: {bad} of {a.size} values are not finite (NaN or +-Inf); replace them "
                               f"(e.g. numpy.nan_to_num) or crop them away first")
