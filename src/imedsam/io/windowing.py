"""Display windows (center, width) for CT and other scalar images.

Convention: a window is ``(center, width)`` in the array's units (Hounsfield units for CT after rescale), as in
the DICOM tags WindowCenter/WindowWidth. It maps ``[center - width/2, center + width/2]`` linearly onto
``[0, 255]`` and clips outside (a plain linear ramp, not DICOM's ``width - 1`` variant: the two differ by less
than one gray level for any clinical width).
"""

from __future__ import annotations

import numpy as np

from imedsam.errors import ImedsamError

#: Named CT windows, ``name -> (center, width)`` in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

Window = tuple[float, float] | str


def resolve_window(window: Window, *, argument: str = "window") -> tuple[float, float]:
    """Return ``(center, width)`` for a named window (see ``CT_WINDOWS``) or a ``(center, width)`` pair.

    Raises:
        ImedsamError: unknown name, not a pair, or a width that is not positive.
    """
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key == "soft":
            key = "soft_tissue"
        if key not in CT_WINDOWS:
            names = ", ".join(CT_WINDOWS)
            raise ImedsamError(f"unknown {argument} {window!r}: use one of {names} or a (center, width) pair")
        return CT_WINDOWS[key]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise ImedsamError(f"{argument} must be a name or a (center, width) pair of numbers, got {window!r}") from exc
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        raise ImedsamError(f"{argument} {window!r}: the center must be finite and the width positive")
    return center, width


def apply_window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``array`` (any shape, any real dtype) through the window ``(center, width)`` to uint8 0-255.

    Values at or below ``center - width/2`` become 0, at or above ``center + width/2`` become 255, linear between.
    NaN becomes 0.

    Returns:
        uint8 array of the same shape.
    """
    if width <= 0:
        raise ImedsamError(f"window width must be positive, got {width}")
    low = float(center) - float(width) / 2.0
    scaled = (np.asarray(array, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / float(width))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
