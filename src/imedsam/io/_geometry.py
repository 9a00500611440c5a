"""Conversions between ITK-style geometry (spacing, LPS origin, direction) and a NIfTI RAS+ affine.

Index order is ITK's (x, y, z) = (column, row, slice) throughout this module; see ``Geometry`` for the
conventions.
"""

from __future__ import annotations

import numpy as np

#: LPS <-> RAS flip (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_to_affine(spacing_xyz, origin_lps, direction) -> np.ndarray:
    """4x4 RAS+ affine from ITK spacing ``(sx, sy, sz)``, LPS origin (3) and direction (9, row-major 3x3)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_RAS @ d @ np.diag(np.asarray(spacing_xyz, dtype=np.float64))
    aff[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=np.float64)
    return aff


def affine_to_itk(affine) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK ``(spacing_xyz, origin_lps, direction)`` from a 4x4 RAS+ affine (inverse of ``itk_to_affine``)."""
    aff = np.asarray(affine, dtype=np.float64)
    m = aff[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    safe = np.where(spacing > 0, spacing, 1.0)
    direction = LPS_TO_RAS @ (m / safe)
    origin = LPS_TO_RAS @ aff[:3, 3]
    return (tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
            tuple(float(v) for v in direction.reshape(-1)))


def as_tuple_matrix(matrix) -> tuple[tuple[float, ...], ...]:
    """A 2D array as a tuple of float tuples (hashable, for the frozen ``Geometry``)."""
    return tuple(tuple(float(v) for v in row) for row in np.asarray(matrix, dtype=np.float64))
