"""Discover a dataset folder: image/mask folder pairs or the nnU-Net raw layout, plus train/val/test splits.

Two layouts are recognised (``discover`` tells them apart; anything else is a user error that names both):

**Folder pairs** (2D or 3D)::

    root/images/<stem>.<ext>      # .png .jpg .jpeg .tif .tiff .bmp .nii .nii.gz .mha .nrrd
    root/masks/<stem>.<ext>       # same stem, any supported extension: binary 0/255 or 0/1, or a label map
    root/splits.json              # optional: {"train": [stems], "val": [...], "test": [...]} (other keys ignored)

**SAM-Med2D JSON** (one binary mask file per object, as SAM-Med2D's ``data_demo``)::

    root/image2label_train.json   # {"<image path>": ["<mask path>", ...]}   -> split "train"
    root/label2image_test.json    # {"<mask path>": "<image path>"}          -> split "test"
    (paths relative to root, or to a parent folder: leading folders that do not exist under root are dropped)

Each image is one case; its mask files are its objects, named by what follows the image stem in the mask's
name (``amos_0006_90_liver_000.png`` -> ``liver_000``). Object names form one vocabulary over the dataset
(``DatasetIndex.labels``, id -> name), so a case's label map has the same id for the same object name in every
image. Overlapping object masks of one image are a user error (a label map cannot hold them).

**nnU-Net raw** (the ``DatasetXXX_Name`` folder)::

    root/dataset.json             # optional here; its "labels" ({"background": 0, "liver": 1, ...}) names classes
    root/imagesTr/<case>_0000.<ext>   root/labelsTr/<case>.<ext>     -> split "train"
    root/imagesTs/<case>_0000.<ext>   root/labelsTs/<case>.<ext>     -> split "test" (both optional)

Only channel ``_0000`` is used (other channels are ignored with a log message). A ``splits.json`` at the root
overrides the default splits in either layout. Without any splits, ``assign_splits`` / ``split_ids`` make a
seeded random split from fractions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

__all__ = [
    "CaseRef",
    "DatasetIndex",
    "discover",
    "split_ids",
    "assign_splits",
    "file_stem",
    "SUPPORTED_SUFFIXES",
    "SPLIT_NAMES",
]

#: Suffixes recognised as images or masks (lower case; ``.nii.gz`` is one suffix).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii.gz", ".nii", ".mha", ".nrrd",
)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_EXPECTED = (
    "expected either folder pairs 'images/' + 'masks/' (files matched by stem, optional splits.json) or the "
    "nnU-Net raw layout 'imagesTr/<case>_0000.<ext>' + 'labelsTr/<case>.<ext>' (optional imagesTs/labelsTs, "
    "dataset.json)"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in SUPPORTED_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def file_stem(path: str | os.PathLike) -> str:
    """File name without its (possibly double, e.g. ``.nii.gz``) suffix."""
    p = Path(path)
    s = _suffix(p)
    return p.name[: len(p.name) - len(s)] if s else p.name


@dataclass(frozen=True)
class CaseRef:
    """One image file and its mask file.

    Attributes:
        case_id: the file stem (folder pairs) or the nnU-Net case identifier (without ``_0000``).
        image_path: the image file (2D image or 3D volume).
        mask_path: the mask file on the same grid, or ``None`` for unlabelled cases (``require_masks=False``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` when not assigned.
        object_masks: SAM-Med2D layout: ``(object id, binary mask file)`` pairs that make up the case's label map
            (``mask_path`` is then ``None``).
    """

    case_id: str
    image_path: Path
    mask_path: Path | None
    split: str | None = None
    object_masks: tuple[tuple[int, Path], ...] | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None or bool(self.object_masks)


@dataclass(frozen=True)
class DatasetIndex:
    """The cases of a dataset folder, sorted by ``case_id``.

    Attributes:
        root: the dataset folder.
        layout: ``"folders"``, ``"nnunet"`` or ``"sammed2d"``.
        cases: the cases.
        labels: class id -> name (from nnU-Net ``dataset.json``, background excluded), or ``None`` when unknown.
    """

    root: Path
    layout: str
    cases: tuple[CaseRef, ...]
    labels: Mapping[int, str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[CaseRef]:
        return iter(self.cases)

    def __getitem__(self, i: int) -> CaseRef:
        return self.cases[i]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def has_splits(self) -> bool:
        """True when at least one case has a split."""
        return any(c.split is not None for c in self.cases)

    def counts(self) -> dict[str | None, int]:
        """Number of cases per split (``None`` = unassigned)."""
        out: dict[str | None, int] = {}
        for c in self.cases:
            out[c.split] = out.get(c.split, 0) + 1
        return out

    def subset(self, split: str | Sequence[str]) -> "DatasetIndex":
        """The cases of one split (or several). Raises when none of the cases has that split."""
        wanted = {split} if isinstance(split, str) else set(split)
        unknown = wanted - set(SPLIT_NAMES)
        if unknown:
            raise ImedsamError(f"split: unknown split name(s) {sorted(unknown)}; use {list(SPLIT_NAMES)}")
        cases = tuple(c for c in self.cases if c.split in wanted)
        if not cases:
            raise ImedsamError(
                f"split: no case of {self.root} is in split {sorted(wanted)} (counts: {self.counts()}); add a "
                f"splits.json or call imedsam.data.assign_splits(index, fractions, seed=...)"
            )
        return replace(self, cases=cases)

    def with_splits(self, splits: Mapping[str, Sequence[str]]) -> "DatasetIndex":
        """A copy whose case splits are set from ``{"train": [ids], "val": [...], "test": [...]}``.

        Cases absent from every list get ``split=None``; an id that is not a case, or one listed in two splits,
        is an error naming it.
        """
        lookup = _invert_splits(splits, set(self.case_ids), source="splits")
        return replace(self, cases=tuple(replace(c, split=lookup.get(c.case_id)) for c in self.cases))


# ------------------------------------------------------------------------------------------------------ splits


def _invert_splits(splits: Mapping[str, Sequence[str]], known: set[str], *, source: str) -> dict[str, str]:
    lookup: dict[str, str] = {}
    for name in SPLIT_NAMES:
        ids = splits.get(name, [])
        if not isinstance(ids, (list, tuple)):
            raise ImedsamError(f"{source}: '{name}' must be a list of case ids (file stems), got {type(ids).__name__}")
        for cid in ids:
            cid = str(cid)
            if cid in lookup and lookup[cid] != name:
                raise ImedsamError(f"{source}: case '{cid}' is listed in both '{lookup[cid]}' and '{name}'; "
                                   f"keep it in one split")
            lookup[cid] = name
    missing = sorted(set(lookup) - known)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ImedsamError(f"{source}: {len(missing)} listed case(s) have no image+mask pair: {shown}; "
                           f"remove them from the split lists or add the files")
    if not any(name in splits for name in SPLIT_NAMES):
        raise ImedsamError(f"{source}: no 'train', 'val' or 'test' list found; give at least one of them")
    return lookup


def split_ids(
    case_ids: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int
) -> dict[str, list[str]]:
    """Seeded random split of ``case_ids`` into ``train``/``val``/``test`` by ``fractions``.

    The ids are sorted first, so the result depends only on the set of ids and the seed. Sizes are
    ``round(f * n)`` for train and val and the remainder for test (60/20/20 of 196 gives 118/39/39). Fractions
    may have 2 entries (train/val) or 3 (train/val/test) and must sum to 1.
    """
    fr = [float(f) for f in fractions]
    if len(fr) not in (2, 3) or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ImedsamError(f"fractions: {tuple(fractions)} must be 2 or 3 non-negative numbers that sum to 1, "
                           f"e.g. (0.6, 0.2, 0.2)")
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise ImedsamError("case_ids: duplicated case ids; ids must be unique")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n = len(ids)
    n_train = int(round(fr[0] * n))
    n_val = n - n_train if len(fr) == 2 else min(int(round(fr[1] * n)), n - n_train)
    out = {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val])}
    if len(fr) == 3:
        out["test"] = sorted(shuffled[n_train + n_val:])
    return out


def assign_splits(
    index: DatasetIndex, fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int, overwrite: bool = False
) -> DatasetIndex:
    """Give every case a split from a seeded random split (see ``split_ids``).

    With ``overwrite=False`` (default) existing splits are kept and only a dataset without any split is split;
    for nnU-Net, where ``imagesTs`` cases are ``test`` already, only the unassigned/``train`` cases are divided
    with the renormalised train/val fractions.
    """
    if index.has_splits and not overwrite:
        if index.layout == "nnunet" and not any(c.split == "val" for c in index.cases):
            pool = [c.case_id for c in index.cases if c.split in (None, "train")]
            fr = [float(f) for f in fractions][:2]
            total = sum(fr)
            if total <= 0:
                raise ImedsamError(f"fractions: {tuple(fractions)} gives no train/val share")
            parts = split_ids(pool, (fr[0] / total, fr[1] / total), seed=seed)
            test = [c.case_id for c in index.cases if c.split == "test"]
            return index.with_splits({**parts, "test": test})
        logger.info("%s already has splits %s; keeping them (pass overwrite=True to resplit)",
                    index.root, index.counts())
        return index
    return index.with_splits(split_ids(index.case_ids, fractions, seed=seed))


# --------------------------------------------------------------------------------------------------- discovery


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and _suffix(p) in SUPPORTED_SUFFIXES)


def _by_stem(files: list[Path], folder: Path, strip: str = "") -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        stem = file_stem(p)
        if strip:
            stem = stem[: -len(strip)]
        if stem in out:
            raise ImedsamError(f"{folder}: two files share the stem '{stem}' ({out[stem].name}, {p.name}); "
                               f"keep one file per case")
        out[stem] = p
    return out


def _pair(images: dict[str, Path], masks: dict[str, Path], *, mask_folder: Path, split: str | None,
          require_masks: bool, mask_folder_exists: bool = True) -> list[CaseRef]:
    missing = sorted(set(images) - set(masks))
    if missing and require_masks and mask_folder_exists:
        shown = ", ".join(images[m].name for m in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ImedsamError(f"{mask_folder}: no mask for {len(missing)} image(s): {shown}; add masks with the same "
                           f"file stem (or remove those images)")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        logger.warning("%s: %d mask(s) without an image are ignored (e.g. %s)", mask_folder, len(orphans),
                       masks[orphans[0]].name)
    return [CaseRef(s, images[s], masks.get(s), split) for s in sorted(images)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImedsamError(f"{path}: cannot read JSON ({exc}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ImedsamError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _discover_folders(root: Path, require_masks: bool) -> tuple[list[CaseRef], None]:
    img_dir, mask_dir = root / "images", root / "masks"
    if not mask_dir.is_dir():
        raise ImedsamError(f"{root}: found 'images/' but no 'masks/' folder; {_EXPECTED}")
    files = _list_files(img_dir)
    if not files:
        raise ImedsamError(f"{img_dir}: no image files (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    cases = _pair(_by_stem(files, img_dir), _by_stem(_list_files(mask_dir), mask_dir), mask_folder=mask_dir,
                  split=None, require_masks=require_masks)
    return cases, None


def _nnunet_images(folder: Path) -> dict[str, Path]:
    files = _list_files(folder)
    channel0 = [p for p in files if file_stem(p).endswith("_0000")]
    others = [p for p in files if not file_stem(p).endswith("_0000")]
    if others:
        bad = [p for p in others if not (len(file_stem(p)) > 5 and file_stem(p)[-5] == "_"
                                         and file_stem(p)[-4:].isdigit())]
        if bad:
            raise ImedsamError(f"{folder}: '{bad[0].name}' lacks the nnU-Net channel suffix; name images "
                               f"<case>_0000.<ext> (channel 0)")
        logger.info("%s: %d extra channel file(s) (_0001...) are ignored; only channel _0000 is used",
                    folder, len(others))
    return _by_stem(channel0, folder, strip="_0000")


def _discover_nnunet(root: Path, require_masks: bool) -> tuple[list[CaseRef], dict[int, str] | None]:
    labels: dict[int, str] | None = None
    ds = root / "dataset.json"
    if ds.is_file():
        info = _read_json(ds)
        raw = info.get("labels")
        if isinstance(raw, dict):
            labels = {}
            for name, value in raw.items():
                ids = value if isinstance(value, list) else [value]  # region-based entries list several ids
                if len(ids) == 1 and int(ids[0]) != 0:
                    labels[int(ids[0])] = str(name)
    cases: list[CaseRef] = []
    tr = _nnunet_images(root / "imagesTr")
    if not tr:
        raise ImedsamError(f"{root / 'imagesTr'}: no '<case>_0000.<ext>' image files")
    lab_tr = root / "labelsTr"
    if not lab_tr.is_dir():
        raise ImedsamError(f"{root}: found 'imagesTr/' but no 'labelsTr/' folder; {_EXPECTED}")
    cases += _pair(tr, _by_stem(_list_files(lab_tr), lab_tr), mask_folder=lab_tr, split="train",
                   require_masks=require_masks)
    ts_dir, lab_ts = root / "imagesTs", root / "labelsTs"
    if ts_dir.is_dir():
        ts = _nnunet_images(ts_dir)
        if lab_ts.is_dir():
            cases += _pair(ts, _by_stem(_list_files(lab_ts), lab_ts), mask_folder=lab_ts, split="test",
                           require_masks=require_masks)
        elif require_masks:
            logger.info("%s: no labelsTs/ folder, so the %d imagesTs case(s) are skipped "
                        "(pass require_masks=False to keep them unlabelled)", root, len(ts))
        else:
            cases += [CaseRef(s, ts[s], None, "test") for s in sorted(ts)]
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise ImedsamError(f"{root}: case '{dup}' is in both imagesTr and imagesTs; give test cases other names")
    return cases, labels


SAMMED2D_FILES = ("image2label_train.json", "label2image_test.json")


def _resolve(root: Path, entry: str, source: Path) -> Path:
    """A path from a SAM-Med2D JSON: under ``root`` as written, or with leading folders dropped."""
    parts = Path(entry).parts
    for i in range(len(parts)):
        candidate = root.joinpath(*parts[i:])
        if candidate.is_file():
            return candidate
    raise ImedsamError(f"{source}: file {entry!r} not found under {root} (leading folders may be dropped, but "
                       f"the rest of the path must exist)")


def _discover_sammed2d(root: Path) -> tuple[list[CaseRef], dict[int, str]]:
    groups: dict[Path, dict] = {}  # image -> {"split": ..., "masks": [paths]}
    train_file, test_file = (root / name for name in SAMMED2D_FILES)
    if train_file.is_file():
        for image, masks in _read_json(train_file).items():
            if not isinstance(masks, list):
                raise ImedsamError(f"{train_file}: entry {image!r} must map to a list of mask paths")
            img = _resolve(root, image, train_file)
            groups.setdefault(img, {"split": "train", "masks": []})["masks"] += [_resolve(root, m, train_file)
                                                                                for m in masks]
    if test_file.is_file():
        for mask, image in _read_json(test_file).items():
            img = _resolve(root, str(image), test_file)
            entry = groups.setdefault(img, {"split": "test", "masks": []})
            if entry["split"] != "test":
                raise ImedsamError(f"{test_file}: image {image!r} is also a training image in {train_file.name}")
            entry["masks"].append(_resolve(root, mask, test_file))
    names: dict[Path, str] = {}
    for img, entry in groups.items():
        stem = file_stem(img)
        for m in entry["masks"]:
            ms = file_stem(m)
            names[m] = ms[len(stem) + 1:] if ms.startswith(stem + "_") and len(ms) > len(stem) + 1 else ms
    vocabulary = {name: i + 1 for i, name in enumerate(sorted(set(names.values())))}
    cases = []
    for img, entry in sorted(groups.items()):
        objects = tuple(sorted({(vocabulary[names[m]], m) for m in entry["masks"]}))
        ids = [i for i, _ in objects]
        if len(set(ids)) != len(ids):
            raise ImedsamError(f"{img}: two of its mask files have the same object name; name them "
                               f"<image stem>_<object>.png with distinct objects")
        cases.append(CaseRef(file_stem(img), img, None, entry["split"], objects))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ImedsamError(f"{root}: two images share the file stem {sorted(i for i in ids if ids.count(i) > 1)[0]!r}")
    return cases, {i: name for name, i in vocabulary.items()}


def discover(root: str | os.PathLike, *, require_masks: bool = True) -> DatasetIndex:
    """Find the cases of a dataset folder (layouts in the module docstring).

    Args:
        root: the dataset folder.
        require_masks: when True (default) every image must have a mask (error otherwise) and nnU-Net
            ``imagesTs`` without ``labelsTs`` are skipped; when False they are kept with ``mask_path=None``.

    Returns:
        a ``DatasetIndex`` sorted by case id. Splits come from ``splits.json`` when present, else
        nnU-Net's ``imagesTr``/``imagesTs`` or SAM-Med2D's two JSON files (train/test), else ``None`` (see
        ``assign_splits``).

    Raises:
        ImedsamError: missing/empty folder, no images, an image without a mask, an unknown layout, a
            ``splits.json`` listing stems that are not cases.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImedsamError(f"{root}: dataset folder not found; give the folder that holds images/ + masks/ "
                           f"or imagesTr/ + labelsTr/")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise ImedsamError(f"{root}: the dataset folder is empty; {_EXPECTED}")
    if (root / "imagesTr").is_dir():
        layout = "nnunet"
        cases, labels = _discover_nnunet(root, require_masks)
    elif any((root / name).is_file() for name in SAMMED2D_FILES):
        layout = "sammed2d"
        cases, labels = _discover_sammed2d(root)
    elif (root / "images").is_dir():
        layout = "folders"
        cases, labels = _discover_folders(root, require_masks)
    else:
        names = ", ".join(sorted(p.name for p in entries)[:8])
        raise ImedsamError(f"{root}: unknown dataset layout (found: {names}); {_EXPECTED}")
    index = DatasetIndex(root=root, layout=layout, cases=tuple(cases), labels=labels)
    splits_file = root / "splits.json"
    if splits_file.is_file():
        data = _read_json(splits_file)
        lookup = _invert_splits(data, set(index.case_ids), source=str(splits_file))
        unassigned = [c.case_id for c in index.cases if c.case_id not in lookup]
        if unassigned:
            logger.warning("%s: %d case(s) are in no split (e.g. %s)", splits_file, len(unassigned), unassigned[0])
        index = replace(index, cases=tuple(replace(c, split=lookup.get(c.case_id)) for c in index.cases))
    logger.info("discovered %d case(s) in %s (layout %s, splits %s)", len(index), root, layout, index.counts())
    return index
