"""What an nnU-Net raw dataset declares about one of its image files: the name of its channel (``dataset.json``).

nnU-Net chooses each channel's intensity normalisation from that name (``channel_names`` in v2, ``modality`` in
v1): ``"CT"`` (any case) gets the CT scheme, anything else (``"MRI"``, ``"LGE-MRI"``, ``"T2"``...) a per-image one.
imedsam follows the same split for its display mapping (:func:`imedsam.io.images.display_window`), so a file
read from ``<root>/imagesTr/`` or ``<root>/imagesTs/`` carries its declared channel name in
``Sample.meta["channel_name"]``, wherever it is read from (training, evaluation, ``imedsam segment``,
``imedsam predict``). A file elsewhere has no declared channel: it is mapped by its own information.

The channel of a file is the 4-digit suffix of its name (``la_003_0000.nii.gz`` -> ``"0"``); ``dataset.json`` is
the one in the images folder's parent. A missing or unreadable ``dataset.json`` declares nothing (logged once).
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from imedsam.io.atomic import full_suffix

log = logging.getLogger(__name__)

#: the nnU-Net raw folders whose files a ``dataset.json`` one level up describes
IMAGE_FOLDERS: tuple[str, ...] = ("imagesTr", "imagesTs")

#: the channel name (case-insensitive) nnU-Net normalises as CT
CT_CHANNEL = "ct"

__all__ = ["CT_CHANNEL", "IMAGE_FOLDERS", "declared_channel", "is_ct_channel"]


def _channel_index(path: Path) -> int | None:
    """``case_0000.nii.gz`` -> 0; None when the name has no ``_NNNN`` channel suffix."""
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return int(stem[-4:])
    return None


@lru_cache(maxsize=32)
def _channel_names(dataset_json: str, mtime_ns: int) -> dict[int, str]:
    """Channel index -> name from ``channel_names`` (nnU-Net v2) or ``modality`` (v1); {} when unreadable."""
    del mtime_ns  # part of the cache key only: an edited file is read again
    try:
        info = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read it (%s); its channel names are not used for intensity defaults",
                    dataset_json, exc.__class__.__name__)
        return {}
    raw = info.get("channel_names", info.get("modality")) if isinstance(info, dict) else None
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, name in raw.items():
        try:
            out[int(key)] = str(name)
        except (TypeError, ValueError):
            continue
    return out


def declared_channel(path: str | os.PathLike) -> str | None:
    """The channel name the nnU-Net ``dataset.json`` of ``path`` declares for it (module docstring), else None."""
    p = Path(path)
    if p.parent.name not in IMAGE_FOLDERS:
        return None
    channel = _channel_index(p)
    dataset_json = p.parent.parent / "dataset.json"
    if channel is None or not dataset_json.is_file():
        return None
    return _channel_names(str(dataset_json), dataset_json.stat().st_mtime_ns).get(channel)


def is_ct_channel(name: str | None) -> bool:
    """Whether nnU-Net would normalise a channel of this name as CT (``"CT"``, any case)."""
    return name is not None and name.strip().casefold() == CT_CHANNEL
