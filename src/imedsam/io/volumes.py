"""3D volumes: NIfTI (nibabel), MHA/NRRD (SimpleITK, optional extra ``volumes``), DICOM series folders.

Axis convention: ``Sample.array`` is ``(D, H, W)`` = ``(z, y, x)``, i.e. the file's index order reversed. For
NIfTI that is nibabel's ``(X, Y, Z)`` data transposed, ``array[k, j, i] == nifti_data[i, j, k]``, the same
order SimpleITK's ``GetArrayFromImage`` returns. ``geometry.spacing`` is ``(dz, dy, dx)`` in mm (norms of the
affine's columns, reversed), ``geometry.affine`` is the file's RAS+ affine (index order (x, y, z)), and
``origin``/``direction`` are the LPS values SimpleITK would report (see ``Geometry``). Values keep the file's
dtype; NIfTI scaling (scl_slope/scl_inter) is applied when set (then float32). A file of an nnU-Net raw dataset
carries the channel name its ``dataset.json`` declares in ``meta["channel_name"]`` (:mod:`imedsam.io.nnunet`).

Writing (``write_volume``) puts a (D, H, W) array back on the grid of a ``like`` sample: NIfTI gets the same
qform/sform (and codes) as the file ``like`` was read from, or ``like.geometry.affine`` when it did not come from
NIfTI; MHA/NRRD get ``like``'s spacing/origin/direction. Writes are atomic.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write, full_suffix
from imedsam.io._geometry import affine_to_itk, as_tuple_matrix, itk_to_affine
from imedsam.io.nnunet import declared_channel
from imedsam.io.sample import Geometry, Sample

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ITK_SUFFIXES: tuple[str, ...] = (".mha", ".mhd", ".nrrd", ".nhdr")
ITK_WRITE_SUFFIXES: tuple[str, ...] = (".mha", ".nrrd")  # single-file formats: an atomic rename moves all of it
VOLUME_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + ITK_SUFFIXES


def _sitk(path: Path):
    try:
        import SimpleITK as sitk  # noqa: N813 - the library's own spelling
    except ImportError as exc:
        raise ImedsamError(f"{path}: MHA/NRRD files need SimpleITK; install it with "
                           "pip install 'imedsam[volumes]' (or pip install SimpleITK)") from exc
    return sitk


def read_volume(path: str | os.PathLike) -> Sample:
    """Read a NIfTI/MHA/NRRD file or a DICOM series folder into a (D, H, W) ``Sample``.

    See the module docstring for the axis and world conventions. 2D files become (1, H, W); 4D files with one
    volume are squeezed; multi-volume (4D) or vector-valued files are refused.

    Raises:
        ImedsamError: missing, corrupt or unsupported file; SimpleITK missing for MHA/NRRD.
    """
    p = Path(path)
    if p.is_dir():
        from imedsam.io.dicom import read_dicom_series

        return read_dicom_series(p)
    if not p.is_file():
        raise ImedsamError(f"file not found: {p}")
    suffix = full_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _declared(_read_nifti(p), p)
    if suffix in ITK_SUFFIXES:
        return _declared(_read_itk(p), p)
    raise ImedsamError(f"unsupported volume file {p}: use one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder")


def _declared(sample: Sample, p: Path) -> Sample:
    """``meta["channel_name"]``: the channel its nnU-Net ``dataset.json`` declares (:mod:`imedsam.io.nnunet`)."""
    channel = declared_channel(p)
    if channel is not None:
        sample.meta["channel_name"] = channel
    return sample


def _to_3d(data: np.ndarray, p: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ImedsamError(f"{p} has shape {data.shape}: only single 3D volumes are supported; "
                           "split the 4D/multi-channel file into one file per volume")
    return data


def _read_nifti(p: Path) -> Sample:
    try:
        img = nib.load(str(p))
        header = img.header
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError,
            nib.spatialimages.HeaderDataError) as exc:
        raise ImedsamError(f"cannot read NIfTI file {p}: it is corrupt or truncated "
                           f"({type(exc).__name__}: {exc})") from exc
    if data.dtype == np.float64 and header.get_data_dtype() != np.float64:
        data = data.astype(np.float32)  # scaled integers: float32 is plenty
    data = _to_3d(np.asarray(data), p)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing_xyz, origin, direction = affine_to_itk(affine)
    meta: dict = {"format": "nifti"}
    if isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        qform, qcode = img.get_qform(coded=True)
        sform, scode = img.get_sform(coded=True)
        meta["nifti"] = {
            "qform": as_tuple_matrix(qform) if qform is not None else None,
            "qform_code": int(qcode),
            "sform": as_tuple_matrix(sform) if sform is not None else None,
            "sform_code": int(scode),
            "xyzt_units": tuple(header.get_xyzt_units()),
            "dtype": str(header.get_data_dtype()),
        }
    geometry = Geometry(shape=tuple(int(s) for s in array.shape), spacing=tuple(reversed(spacing_xyz)),
                        origin=origin, direction=direction, affine=as_tuple_matrix(affine), source=p)
    return Sample(array=array, geometry=geometry, meta=meta)


def _read_itk(p: Path) -> Sample:
    sitk = _sitk(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ImedsamError(f"cannot read volume file {p}: it is corrupt or unsupported ({first_line})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImedsamError(f"{p} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                           "only scalar volumes are supported")
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise ImedsamError(f"{p} is {dim}D; only 2D or 3D files are supported")
    array = sitk.GetArrayFromImage(img)  # (z, y, x)
    spacing_xyz = tuple(float(v) for v in img.GetSpacing())
    origin = tuple(float(v) for v in img.GetOrigin())
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        array = array[None]
        spacing_xyz = spacing_xyz + (1.0,)
        origin = origin + (0.0,)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    affine = itk_to_affine(spacing_xyz, origin, direction)
    geometry = Geometry(shape=tuple(int(s) for s in array.shape), spacing=tuple(reversed(spacing_xyz)),
                        origin=origin, direction=tuple(float(v) for v in direction.reshape(-1)),
                        affine=as_tuple_matrix(affine), source=p)
    return Sample(array=np.ascontiguousarray(array), geometry=geometry, meta={"format": full_suffix(p)[1:]})


def _storable(array: np.ndarray) -> np.ndarray:
    """bool -> uint8; wide integers -> the smallest of uint8/int16/uint16/int32 holding them; float64 -> float32."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize >= 4:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return array.astype(dt)
        raise ImedsamError(f"volume values {lo}..{hi} do not fit in int32; rescale them before writing")
    if array.dtype in (np.float64, np.float16):
        return array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImedsamError(f"cannot write a volume of dtype {array.dtype}; use integers, floats or bool")
    return array


def write_volume(path: str | os.PathLike, array: np.ndarray, like: Sample) -> Path:
    """Write a (D, H, W) array onto the grid of ``like`` (NIfTI, MHA or NRRD), atomically.

    Args:
        path: ``.nii``/``.nii.gz`` (nibabel) or ``.mha``/``.nrrd`` (SimpleITK); parent folders are created.
        array: (D, H, W), same shape as ``like.geometry.shape``. bool is written as uint8, wide integers in
            the smallest integer type that holds them, float64 as float32.
        like: the sample the array belongs to (usually what ``read_volume`` returned for the input image).

    Returns:
        the written path. Reading it back gives the same ``geometry.affine`` (voxel-to-world mapping).
    """
    p = Path(path)
    arr = np.asarray(array)
    geom = like.geometry
    if arr.ndim != 3 or tuple(arr.shape) != tuple(geom.shape):
        raise ImedsamError(f"cannot write {p}: array shape {arr.shape} does not match the reference volume "
                           f"{tuple(geom.shape)} (D, H, W)")
    arr = _storable(arr)
    suffix = full_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        image = _nifti_like(arr, like)
        return atomic_write(p, lambda tmp: nib.save(image, str(tmp)))
    if suffix in ITK_WRITE_SUFFIXES:
        sitk = _sitk(p)
        img = sitk.GetImageFromArray(arr)
        spacing_xyz, origin, direction = _itk_geometry(geom)
        img.SetSpacing(spacing_xyz)
        img.SetOrigin(origin)
        img.SetDirection(direction)
        return atomic_write(p, lambda tmp: sitk.WriteImage(img, str(tmp), True))
    raise ImedsamError(f"cannot write volume {p}: use one of {', '.join(NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES)}")


def _fallback_affine(geom: Geometry) -> np.ndarray:
    spacing = geom.spacing if geom.spacing is not None else (1.0, 1.0, 1.0)
    logger.warning("reference volume has no world geometry; writing spacing %s with an identity orientation",
                   spacing)
    return np.diag(list(reversed([float(s) for s in spacing])) + [1.0])


def _itk_geometry(geom: Geometry) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    if geom.origin is not None and geom.direction is not None and geom.spacing is not None \
            and len(geom.origin) == 3 and len(geom.direction) == 9:
        return tuple(float(s) for s in reversed(geom.spacing)), tuple(geom.origin), tuple(geom.direction)
    affine = np.asarray(geom.affine, dtype=np.float64) if geom.affine is not None else _fallback_affine(geom)
    return affine_to_itk(affine)


def _nifti_like(arr: np.ndarray, like: Sample) -> nib.Nifti1Image:
    geom = like.geometry
    nifti = like.meta.get("nifti") if isinstance(like.meta, dict) else None
    affine = np.asarray(geom.affine, dtype=np.float64) if geom.affine is not None else _fallback_affine(geom)
    image = nib.Nifti1Image(arr.transpose(2, 1, 0), affine)
    header = image.header
    if nifti:
        qform = np.asarray(nifti["qform"]) if nifti.get("qform") is not None else affine
        sform = np.asarray(nifti["sform"]) if nifti.get("sform") is not None else affine
        image.set_qform(qform, code=int(nifti.get("qform_code", 1)))
        image.set_sform(sform, code=int(nifti.get("sform_code", 1)))
        units = nifti.get("xyzt_units") or ("mm", "sec")
        header.set_xyzt_units(*units)
    else:
        image.set_qform(affine, code=1)  # scanner coordinates (DICOM/ITK origin)
        image.set_sform(affine, code=1)
        header.set_xyzt_units("mm", "sec")
    header.set_data_dtype(arr.dtype)
    return image
