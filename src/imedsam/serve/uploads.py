"""An uploaded file -> a :class:`~imedsam.io.sample.Sample`, read by the same code as the CLI.

Nothing the client sends reaches the file system as a path: the upload is written under a server-made name in a
private temporary folder, keeping only a whitelisted suffix of the client's file name (which decides the reader);
a zip (a DICOM series) is unpacked member by member under server-made names, with a cap on the unpacked size.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from imedsam import io
from imedsam.errors import ImedsamError
from imedsam.io.atomic import full_suffix
from imedsam.io.sample import Sample, require_finite

#: suffixes accepted from the client's file name (anything else is read only if it is DICOM by content)
ACCEPTED_SUFFIXES: tuple[str, ...] = io.SUPPORTED_SUFFIXES + (".zip",)


class UploadTooLarge(ImedsamError):
    """The upload (or a zip's content) is over the server's limit: HTTP 413."""


def upload_suffix(filename: str) -> str:
    """The reader-deciding suffix of a client file name ('' when none of ours: then DICOM content is tried)."""
    name = Path(str(filename).replace("\\", "/")).name
    suffix = full_suffix(Path(name)) if name else ""
    return suffix if suffix in ACCEPTED_SUFFIXES else ""


@dataclass(frozen=True)
class Upload:
    """What an upload gave: the image or volume, and for DICOM inputs the slices' headers in array order (what a
    DICOM-SEG of the result refers to; the files themselves are not kept)."""

    sample: Sample
    dicom_headers: list | None = None


def read_upload(data_path: Path, filename: str, *, max_unpacked: int, max_voxels: int) -> Upload:
    """Read an upload saved at ``data_path`` (a server-made name) whose client name was ``filename``.

    Raises:
        ImedsamError: the same one-line messages as the CLI (unsupported type, corrupt file ...), naming the
            client's file name rather than the temporary path.
        UploadTooLarge: a zip unpacking to more than ``max_unpacked`` bytes, or more than ``max_voxels`` voxels.
    """
    shown = Path(str(filename).replace("\\", "/")).name or "upload"
    suffix = upload_suffix(filename)
    with tempfile.TemporaryDirectory(prefix="imedsam-upload-") as tmp:
        if suffix == ".zip":
            target = _unzip(data_path, Path(tmp), shown, max_unpacked)
        else:
            if not suffix and not io.is_dicom_file(data_path):
                raise ImedsamError(f"{shown}: unsupported file type; open one of {' '.join(ACCEPTED_SUFFIXES)} "
                                   "(a zip holds a DICOM series)")
            target = Path(tmp) / f"image{suffix or '.dcm'}"
            data_path.replace(target)
        try:
            sample = io.read(target)
            headers = None
            if target.is_dir() or suffix in io.DICOM_SUFFIXES or (not suffix and io.is_dicom_file(target)):
                from imedsam.io.dicom_seg import source_headers

                headers = source_headers(sample)
        except ImedsamError as exc:
            raise ImedsamError(str(exc).replace(str(target), shown).replace(str(Path(tmp)), shown)) from None
    if sample.array.size > max_voxels:
        raise UploadTooLarge(f"{shown}: {sample.array.size} values is over this server's limit of {max_voxels}")
    require_finite(sample.array, shown)
    return Upload(sample, headers)


def _unzip(path: Path, folder: Path, shown: str, max_unpacked: int) -> Path:
    """Unpack the regular files of a zip as ``folder/series/000000`` ..., refusing more than ``max_unpacked``
    bytes in all (zip bombs) before writing; member names are never used as paths."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImedsamError(f"{shown}: not a readable zip ({exc}); zip the DICOM series folder again") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
        if not members:
            raise ImedsamError(f"{shown}: the zip holds no files; zip a folder of DICOM slices")
        total = sum(m.file_size for m in members)
        if total > max_unpacked:
            raise UploadTooLarge(f"{shown}: unpacks to {total / 2**20:.0f} MB, over this server's limit of "
                                 f"{max_unpacked / 2**20:.0f} MB")
        series = folder / "series"
        series.mkdir()
        written = 0
        for n, member in enumerate(members):
            with archive.open(member) as src, open(series / f"{n:06d}", "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_unpacked:  # the sizes in the zip's directory lied
                        raise UploadTooLarge(f"{shown}: unpacks to more than {max_unpacked / 2**20:.0f} MB")
                    dst.write(chunk)
    return series
