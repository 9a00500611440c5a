"""Reading and writing images, volumes and DICOM with their geometry.

``read(path)`` picks the reader from the path:

* a folder: a DICOM series (``read_dicom_series``);
* ``.png .jpg .jpeg .tif .tiff .bmp``: a 2D image (``read_image``);
* ``.nii .nii.gz``, ``.mha .mhd .nrrd .nhdr`` (the latter need SimpleITK): a volume (``read_volume``);
* ``.dcm .dicom .ima``, or any file with the DICOM ``DICM`` magic: one DICOM image (``read_dicom``).

Array and world conventions are documented on ``Geometry`` and in each reader's module.
"""

from __future__ import annotations

import os
from pathlib import Path

from imedsam.errors import ImedsamError
from imedsam.io.atomic import full_suffix
from imedsam.io.dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom, read_dicom_series
from imedsam.io.images import (
    IMAGE_SUFFIXES,
    overlay,
    read_image,
    to_display_rgb,
    to_display_volume,
    write_mask,
    write_overlay,
    write_uncertainty,
)
from imedsam.io.sample import Geometry, Sample
from imedsam.io.volumes import VOLUME_SUFFIXES, read_volume, write_volume
from imedsam.io.windowing import CT_WINDOWS, apply_window, resolve_window

SUPPORTED_SUFFIXES: tuple[str, ...] = IMAGE_SUFFIXES + VOLUME_SUFFIXES + DICOM_SUFFIXES

__all__ = [
    "CT_WINDOWS",
    "Geometry",
    "SUPPORTED_SUFFIXES",
    "Sample",
    "apply_window",
    "read",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_volume",
    "resolve_window",
    "to_display_rgb",
    "to_display_volume",
    "write_mask",
    "overlay",
    "write_overlay",
    "write_uncertainty",
    "write_volume",
]


def read(path: str | os.PathLike) -> Sample:
    """Read any supported image, volume, DICOM file or DICOM series folder into a ``Sample``.

    Raises:
        ImedsamError: ``file not found: <path>``, a corrupt/unreadable file, or an unsupported extension (the
            message lists the supported ones).
    """
    p = Path(path)
    if not p.exists():
        raise ImedsamError(f"file not found: {p}")
    if p.is_dir():
        return read_dicom_series(p)
    suffix = full_suffix(p)
    if suffix in IMAGE_SUFFIXES:
        return read_image(p)
    if suffix in VOLUME_SUFFIXES:
        return read_volume(p)
    if suffix in DICOM_SUFFIXES or is_dicom_file(p):
        return read_dicom(p)
    raise ImedsamError(f"unsupported file type {suffix or '(no extension)'!s} for {p}: use one of "
                       f"{' '.join(SUPPORTED_SUFFIXES)}, a DICOM file or a DICOM series folder")
