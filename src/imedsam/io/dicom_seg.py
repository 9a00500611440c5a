"""Label maps as DICOM Segmentation objects (DICOM-SEG), through highdicom (``pip install 'imedsam[dicom-seg]'``).

A DICOM-SEG refers to the images it segments: it can be written only for a label map on the grid of a DICOM
input (one file, or a series folder read by :func:`imedsam.io.dicom.read_dicom_series`, whose
``meta["files"]`` gives the slices in array order). Each label value present becomes one segment (BINARY
segmentation, segment number = label value, empty frames omitted); the frames reference their source slices, so
viewers (OHIF, 3D Slicer, ITK-SNAP with plugins) place them on the images. Only the source headers are read
(``stop_before_pixels``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write
from imedsam.io.sample import Sample

DICOM_SEG_SUFFIXES: tuple[str, ...] = (".dcm",)


def source_headers(like: Sample) -> list[pydicom.Dataset]:
    """The DICOM headers of the slices of ``like`` in array order (from its source file or series folder)."""
    source = like.geometry.source
    if source is None or not Path(source).exists():
        raise ImedsamError("DICOM-SEG output needs the DICOM input it segments (its files are gone or it was not "
                           "DICOM); write .nii.gz instead")
    src = Path(source)
    files = [src / name for name in like.meta.get("files", [])] if src.is_dir() else [src]
    if not files:
        raise ImedsamError(f"DICOM-SEG output: {src} is not a DICOM series read by imedsam; write .nii.gz instead")
    try:
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ImedsamError(f"DICOM-SEG output: cannot read the source slice headers ({exc})") from None


def check_dicom_seg(like: Sample, argument: str) -> None:
    """Refuse, before any work, a DICOM-SEG output that cannot be written (no highdicom, input not DICOM);
    ``argument`` names the output in the message (e.g. ``--out seg.dcm``)."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ImedsamError(f"{argument}: DICOM-SEG needs highdicom: pip install 'imedsam[dicom-seg]', or write "
                           ".nii.gz / .png") from None
    from imedsam.io.dicom import is_dicom_file

    src = like.geometry.source
    if src is None or not (Path(src).is_dir() or is_dicom_file(src)):
        raise ImedsamError(f"{argument}: a DICOM-SEG refers to DICOM images and the input {src} is not DICOM; "
                           "write .nii.gz (volumes) or .png (images)")


def write_dicom_seg(path: str | os.PathLike, labels: np.ndarray, sources: list[pydicom.Dataset], *,
                    names: dict[int, str] | None = None, algorithm: str = "imedsam") -> Path:
    """Write ``labels`` ((D, H, W) for a series, (H, W) for one image; uint label values, 0 background) as a
    DICOM-SEG of the source slices ``sources`` (headers in array order, e.g. :func:`source_headers`), atomically.

    Args:
        names: segment label per value (default ``object <value>``).
        algorithm: the algorithm name recorded in the segments' AlgorithmIdentificationSequence.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ImedsamError(f"DICOM-SEG output: labels {arr.shape} do not match the {len(sources)} source slices of "
                           f"{sources[0].Rows}x{sources[0].Columns}")
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise ImedsamError("DICOM-SEG output: the label map is empty (a DICOM-SEG needs at least one segment); "
                           "write .nii.gz to keep an empty result")
    if max(values) > 65535:
        raise ImedsamError("DICOM-SEG output: label values must be at most 65535")
    try:
        from importlib.metadata import version

        software = version("imedsam")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        software = "0"
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=software,
                                              family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=(names or {}).get(v, f"object {v}"),
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algo)
        for i, v in enumerate(values)]
    # segment numbers run 1..N in the order of the label values present
    remap = np.zeros(max(values) + 1, dtype=np.uint16)
    remap[values] = np.arange(1, len(values) + 1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[arr], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="imedsam", manufacturer_model_name="imedsam",
        software_versions=software, device_serial_number="0", content_label="IMEDSAM")
    return atomic_write(Path(path), lambda tmp: seg.save_as(tmp))
