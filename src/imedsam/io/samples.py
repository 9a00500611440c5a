"""Small sample files that ship with the dependencies, for demos and tests (no network, no shared data)."""

from __future__ import annotations

from pathlib import Path

from imedsam.errors import ImedsamError


def embedded_ct_slice() -> Path:
    """Path of pydicom's embedded ``CT_small.dcm``: one 128x128 CT slice (int16 stored, intercept -1024,
    pixel spacing 0.661468 mm), read with ``imedsam.io.read`` or ``read_dicom``."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise ImedsamError("pydicom's test file CT_small.dcm is missing; reinstall pydicom (pip install -U pydicom)")
    return Path(path)
