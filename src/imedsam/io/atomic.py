"""Atomic file writes: write a temporary file in the target's folder, then ``os.replace`` it into place.

A reader never sees a half-written file, and a failed write leaves the previous file (if any) untouched and no
temporary file behind. The temporary file keeps the target's full suffix (``.nii.gz``, ``.png``...) because some
writers (nibabel) choose the format from it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)


def full_suffix(path: Path) -> str:
    """Lower-case suffix, with ``.nii.gz``-style double suffixes kept whole (``.nii.gz``, ``.tar.gz``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path``'s parent folders, call ``write(tmp_path)``, then move the temporary file onto ``path``.

    Args:
        path: the final file.
        write: writes the complete file at the path it is given (same folder and suffix as ``path``).

    Returns:
        ``path`` as a ``Path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImedsamError(f"cannot create the folder {target.parent} for {target}: {exc.strerror}; "
                           "choose a writable output path") from exc
    if target.is_dir():
        raise ImedsamError(f"cannot write {target}: it is a folder; give a file name")
    suffix = full_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    tmp = target.parent / f".{stem}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, PermissionError):
            raise ImedsamError(f"cannot write {target}: permission denied; choose a writable output path") from exc
        raise
    logger.debug("wrote %s", target)
    return target


def check_writable(path: str | os.PathLike, argument: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written: not a folder, and its folder exists and is writable
    or can be created (its nearest existing parent is a writable folder). Raises a one-line ImedsamError."""
    target = Path(path)
    if target.is_dir():
        raise ImedsamError(f"{argument}: {target} is a folder; give a file name")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ImedsamError(f"{argument}: cannot create a folder for {target}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImedsamError(f"{argument}: {parent} is not writable; choose an output in a writable folder")
    return target


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks (checkpoint manifests, export manifests)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
