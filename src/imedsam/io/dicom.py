"""DICOM slices and series (pydicom only).

Values: the Modality LUT is applied, i.e. ``RescaleSlope``/``RescaleIntercept`` when present, giving float32
(Hounsfield units for CT); without those tags the stored integers are kept in their dtype. Color images
(SamplesPerPixel 3) are ``(H, W, 3)`` RGB (pydicom converts YBR). MONOCHROME1 values are kept; display inverts.

Geometry (conventions in ``Geometry``): ``spacing`` is ``(row spacing, column spacing)`` = ``(dy, dx)`` from
PixelSpacing for a slice, ``(dz, dy, dx)`` for a series; ``origin`` is ImagePositionPatient (LPS) of the first
voxel; ``direction`` is the 3x3 of (row direction, column direction, slice normal) as columns, from
ImageOrientationPatient; ``affine`` is the matching RAS+ NIfTI affine (for a single slice its z column uses
SliceThickness, else 1 mm).

Windows: ``window`` may be a name from ``CT_WINDOWS`` ("soft_tissue", "lung", "bone", "brain") or a
``(center, width)`` pair; it is stored in ``meta["window"]`` and used by ``to_display_rgb``. Without it,
the file's first WindowCenter/WindowWidth is used when present. The array itself is never windowed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from imedsam.errors import ImedsamError
from imedsam.io._geometry import as_tuple_matrix, itk_to_affine
from imedsam.io.sample import Geometry, Sample
from imedsam.io.windowing import CT_WINDOWS, Window, apply_window, resolve_window

__all__ = ["read_dicom", "read_dicom_series", "is_dicom_file", "apply_window", "CT_WINDOWS", "DICOM_SUFFIXES"]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")

_DECODER_HINT = ("install a decoder for its transfer syntax: pip install pylibjpeg pylibjpeg-libjpeg "
                 "pylibjpeg-openjpeg (or python-gdcm)")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file starts with the DICOM preamble and ``DICM`` magic (bytes 128-131)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dcmread(path: Path) -> pydicom.Dataset:
    """Read a dataset; files without the DICM preamble are read with ``force`` only if they look like DICOM."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        if path.suffix.lower() not in DICOM_SUFFIXES and path.suffix != "":
            raise
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - anything a forced parse of junk raises
            raise InvalidDicomError(str(exc)) from exc
        if "PixelData" not in ds and "Rows" not in ds:
            raise InvalidDicomError("no DICOM header found")
        return ds


def _read_dataset(path: Path) -> pydicom.Dataset:
    if not path.is_file():
        raise ImedsamError(f"file not found: {path}")
    try:
        ds = _dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ImedsamError(f"cannot read DICOM file {path}: it is corrupt or not DICOM "
                           f"({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImedsamError(f"DICOM file {path} has no pixel data (modality {ds.get('Modality', '?')}); "
                           "pass an image file")
    return ds


def _first(value) -> float | None:
    """First number of a possibly multi-valued DICOM element, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _pixels(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, dict]:
    """Pixel array with the Modality LUT applied, and the rescale facts."""
    try:
        raw = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ImedsamError(f"cannot decode the pixels of {path} (transfer syntax {tsuid}): {_DECODER_HINT}") from exc
    except (ValueError, AttributeError, KeyError, TypeError, OSError, EOFError) as exc:
        raise ImedsamError(f"cannot decode the pixels of {path}: the pixel data is corrupt or inconsistent "
                           f"with its header ({type(exc).__name__}: {exc})") from exc
    slope = _first(ds.get("RescaleSlope"))
    intercept = _first(ds.get("RescaleIntercept"))
    facts: dict = {"rescale_slope": slope, "rescale_intercept": intercept}
    if int(ds.get("SamplesPerPixel", 1)) == 1 and (slope is not None or intercept is not None):
        s = 1.0 if slope is None else slope
        b = 0.0 if intercept is None else intercept
        arr = raw.astype(np.float32)
        if s != 1.0:
            arr *= np.float32(s)
        if b != 0.0:
            arr += np.float32(b)
        facts["rescaled"] = True
    elif int(ds.get("SamplesPerPixel", 1)) == 1 and "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        arr = np.asarray(apply_modality_lut(raw, ds))
        facts["rescaled"] = True
    else:
        arr = np.asarray(raw)
        facts["rescaled"] = False
    return np.ascontiguousarray(arr), facts


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(row direction, column direction, normal) unit vectors in LPS, or None when IOP is absent/invalid."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    v = np.asarray([float(x) for x in iop], dtype=np.float64)
    row, col = v[:3], v[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    n = np.linalg.norm(normal)
    if n < 1e-6:
        return None
    return row, col, normal / n


def _position(ds: pydicom.Dataset) -> np.ndarray | None:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        return None
    return np.asarray([float(x) for x in ipp], dtype=np.float64)


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing")
    if ps is None or len(ps) != 2:
        return None
    dy, dx = float(ps[0]), float(ps[1])
    return (dy, dx) if dy > 0 and dx > 0 else None


def _meta(ds: pydicom.Dataset, window: Window | None, facts: dict) -> dict:
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if window is not None:
        chosen = resolve_window(window)
    elif center is not None and width is not None and width > 0:
        chosen = (center, width)
    else:
        chosen = None
    modality = str(ds.get("Modality", "")) or None
    meta = {
        "modality": modality,
        "window_center": center,
        "window_width": width,
        "window": chosen,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")) or None,
        "slice_thickness": _first(ds.get("SliceThickness")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "instance_number": int(_first(ds.get("InstanceNumber"))) if _first(ds.get("InstanceNumber")) is not None
        else None,
        "units": "HU" if modality == "CT" and facts.get("rescaled") else None,
        **facts,
    }
    return meta


def read_dicom(path: str | os.PathLike, *, window: Window | None = None) -> Sample:
    """Read one DICOM image (a slice) into a ``Sample`` (conventions in the module docstring).

    Args:
        path: a DICOM file (with or without the DICM preamble when its suffix is .dcm/.dicom/.ima).
        window: display window, a name from ``CT_WINDOWS`` or ``(center, width)``; stored in ``meta["window"]``.

    Returns:
        ``array`` (H, W) float32 when rescaled (HU for CT), else the stored dtype; (H, W, 3) for color.
        A multi-frame file gives (F, H, W) with ``spacing`` ``None`` (per-frame geometry is not read).
        ``meta``: modality, window_center, window_width (from the file), window (the one to display with),
        rescale_slope, rescale_intercept, photometric_interpretation, slice_thickness, units...

    Raises:
        ImedsamError: missing, corrupt or non-image file, unknown window, no decoder for its compression.
    """
    p = Path(path)
    ds = _read_dataset(p)
    array, facts = _pixels(ds, p)
    meta = _meta(ds, window, facts)
    n_frames = int(_first(ds.get("NumberOfFrames")) or 1)
    if n_frames > 1:
        meta["n_frames"] = n_frames
        logger.info("%s is multi-frame (%d frames): read as a (F, H, W) stack without spacing", p, n_frames)
        shape = tuple(int(s) for s in array.shape[:3])
        return Sample(array=array, geometry=Geometry(shape=shape, source=p), meta=meta)
    spacing = _pixel_spacing(ds)
    orientation, position = _orientation(ds), _position(ds)
    origin = direction = affine = None
    if orientation is not None and position is not None:
        row, col, normal = orientation
        matrix = np.stack([row, col, normal], axis=1)
        dy, dx = spacing if spacing is not None else (1.0, 1.0)
        dz = meta["slice_thickness"] or 1.0
        origin = tuple(float(v) for v in position)
        direction = tuple(float(v) for v in matrix.reshape(-1))
        affine = as_tuple_matrix(itk_to_affine((dx, dy, dz), position, matrix))
    geometry = Geometry(shape=tuple(int(s) for s in array.shape[:2]), spacing=spacing, origin=origin,
                        direction=direction, affine=affine, source=p)
    return Sample(array=array, geometry=geometry, meta=meta)


def read_dicom_series(folder: str | os.PathLike, *, window: Window | None = None,
                      series_uid: str | None = None) -> Sample:
    """Read a folder of single-frame DICOM slices (one series) into a (D, H, W) volume.

    Slices are sorted by the projection of ImagePositionPatient on the slice normal (row x column direction),
    ascending, so ``array[0]`` is the most "negative" slice along the normal and the slice axis of ``direction``
    is that normal (a right-handed frame). ``spacing`` is ``(dz, dy, dx)`` with ``dz`` the median gap between
    sorted positions; irregular gaps (> 1 %) are logged and flagged in ``meta["uniform_spacing"]``. Without
    positions, slices are sorted by InstanceNumber and ``dz`` is SliceThickness (then no world geometry).
    Files that are not DICOM (DICOMDIR, notes, hidden files) are skipped; sub-folders are not searched.

    Args:
        folder: the folder holding the slices.
        window: display window as in ``read_dicom``.
        series_uid: the SeriesInstanceUID to read when the folder holds several series.

    Raises:
        ImedsamError: no DICOM slices, several series without ``series_uid``, inconsistent slices, two slices at
            one position (a 4D or multi-echo series), or any slice unreadable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImedsamError(f"file not found: {root}" if not root.exists() else f"{root} is not a folder")
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        try:
            ds = _dcmread(p)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            logger.debug("skipping %s: not DICOM", p)
            continue
        if "PixelData" not in ds:
            continue
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    if not by_series:
        raise ImedsamError(f"no DICOM images found in folder {root}; pass a folder of .dcm slices")
    if series_uid is not None:
        if series_uid not in by_series:
            raise ImedsamError(f"series {series_uid} not found in {root}; it holds: {', '.join(by_series)}")
        items = by_series[series_uid]
    elif len(by_series) > 1:
        listing = ", ".join(f"{uid or '<none>'} ({len(v)} files)" for uid, v in by_series.items())
        raise ImedsamError(f"folder {root} holds {len(by_series)} DICOM series: {listing}; pass series_uid")
    else:
        items = next(iter(by_series.values()))

    first = items[0][1]
    rows, cols = int(first.Rows), int(first.Columns)
    orient0 = _orientation(first)
    for p, ds in items:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise ImedsamError(f"slice {p} is {ds.Rows}x{ds.Columns} but the series is {rows}x{cols}; "
                               "remove the odd file (localizer?) from the folder")
        if int(_first(ds.get("NumberOfFrames")) or 1) > 1:
            raise ImedsamError(f"{p} is a multi-frame file; read it alone with read_dicom")
        o = _orientation(ds)
        if orient0 is not None and (o is None or not (np.allclose(o[0], orient0[0], atol=1e-4)
                                                       and np.allclose(o[1], orient0[1], atol=1e-4))):
            raise ImedsamError(f"slice {p} has another orientation than the rest of the series in {root}; "
                               "remove localizers or pass series_uid")

    positions = [_position(ds) for _, ds in items]
    meta_extra: dict = {"n_slices": len(items), "uniform_spacing": True}
    if orient0 is not None and all(pos is not None for pos in positions):
        normal = orient0[2]
        along = np.asarray([float(pos @ normal) for pos in positions])
        order = np.argsort(along, kind="stable")
        along = along[order]
        gaps = np.diff(along)
        if len(gaps) and np.min(gaps) < 1e-3:
            i = int(np.argmin(gaps))
            raise ImedsamError(f"slices {items[order[i]][0].name} and {items[order[i + 1]][0].name} in {root} "
                               "share one position (several time points or echoes?); split the series into folders")
        if len(gaps):
            dz = float(np.median(gaps))
            if np.max(np.abs(gaps - dz)) > 0.01 * dz + 1e-3:
                meta_extra["uniform_spacing"] = False
                logger.warning("slice gaps in %s vary from %.3f to %.3f mm; using the median %.3f mm",
                               root, float(gaps.min()), float(gaps.max()), dz)
        else:
            dz = _first(first.get("SpacingBetweenSlices")) or _first(first.get("SliceThickness")) or 1.0
        have_world = True
    else:
        logger.warning("slices in %s lack ImagePositionPatient/ImageOrientationPatient; sorting by InstanceNumber",
                       root)
        numbers = [_first(ds.get("InstanceNumber")) or 0.0 for _, ds in items]
        order = np.argsort(np.asarray(numbers), kind="stable")
        dz = _first(first.get("SliceThickness")) or 1.0
        have_world = False

    sorted_items = [items[i] for i in order]
    arrays, facts_all = [], []
    for p, ds in sorted_items:
        arr, facts = _pixels(ds, p)
        if arr.shape != (rows, cols):
            raise ImedsamError(f"slice {p} has pixel shape {arr.shape}; only gray single-frame series are supported")
        arrays.append(arr)
        facts_all.append(facts)
    if any(f["rescaled"] for f in facts_all):
        volume = np.stack([a.astype(np.float32, copy=False) for a in arrays])
    else:
        volume = np.stack(arrays)

    head = sorted_items[0][1]
    meta = _meta(head, window, facts_all[0])
    meta.update(meta_extra)
    meta["files"] = [p.name for p, _ in sorted_items]
    if len({(f["rescale_slope"], f["rescale_intercept"]) for f in facts_all}) > 1:
        meta["rescale_slope"] = meta["rescale_intercept"] = "per-slice"
    pixel = _pixel_spacing(head)
    spacing = (float(dz), pixel[0], pixel[1]) if pixel is not None else None
    origin = direction = affine = None
    if have_world:
        row, col, normal = orient0
        matrix = np.stack([row, col, normal], axis=1)
        dy, dx = pixel if pixel is not None else (1.0, 1.0)
        pos0 = _position(head)
        origin = tuple(float(v) for v in pos0)
        direction = tuple(float(v) for v in matrix.reshape(-1))
        affine = as_tuple_matrix(itk_to_affine((dx, dy, float(dz)), pos0, matrix))
    geometry = Geometry(shape=tuple(int(s) for s in volume.shape), spacing=spacing, origin=origin,
                        direction=direction, affine=affine, source=root)
    return Sample(array=volume, geometry=geometry, meta=meta)
