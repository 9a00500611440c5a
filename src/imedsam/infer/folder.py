"""``imedsam predict``: every image and volume of a folder, with one model loaded once (nnU-Net's ``predict -i -o``).

Cases are the supported files of the input folder (2-D images, DICOM files, NIfTI/MHA/NRRD volumes) and its
sub-folders that hold a DICOM series; a case's name is its file name without the (double) suffix. Each case gets
one label map in the output folder, on its own grid: ``NAME.png`` for 2-D (uint8 label values, 0 = background),
``NAME.nii.gz`` (or the input's ``.nii`` / ``.mha`` / ``.nrrd``) for volumes, with the input's geometry. Outputs are
written atomically; a case whose output exists is skipped unless ``overwrite``; a failing case is recorded and the
others go on. ``predictions.csv`` (case, prompt, objects, score, seconds, status) is rewritten after every case.

Prompts, one source for the whole run:

* a prompt file (JSON), one entry per case name, an object or a list of objects, each with a ``label`` (default
  1, 2, ... in order) and its prompts::

      {"img_001": {"box": [40, 30, 180, 200]},
       "img_002": [{"box": [10, 10, 60, 50], "label": 1}, {"points": [[120, 96, 1], [60, 40, 0]], "label": 2}],
       "ct_003":  {"box3d": [120, 90, 40, 260, 220, 75], "propagate": false},
       "mr_004":  {"points": [[80, 64, 30, 1]], "propagate": true}}

  2-D boxes are ``[x0, y0, x1, y1]`` (half-open pixels), 2-D points ``[x, y, label]``; 3-D boxes
  ``[i0, j0, k0, i1, j1, k1]`` and points ``[i, j, k, label]`` in voxel indices (:mod:`imedsam.data.volume_prompts`);
* label maps (``boxes_from``): the file of the same name in that folder; each label value present gives one
  object prompted with its tight box (2-D), or its tight 3-D box (volumes; ``propagate`` prompts only its middle
  slice and follows the mask), written with the same label value: re-segmentation and benchmarking;
* ``auto``: SAM's automatic mask generator on 2-D images (instance labels 1..K).
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)

_OBJECT_KEYS = {"box", "points", "box3d", "label", "propagate"}
#: output suffixes a volume keeps (single files); others become .nii.gz
_VOLUME_OUT = (".nii.gz", ".nii", ".mha", ".nrrd")


@dataclass(frozen=True)
class ObjectPrompt:
    """One object of a case: its output label value and its prompts (2-D or 3-D coordinates)."""

    label: int
    box: tuple[float, ...] | None = None
    points: tuple[tuple[float, ...], ...] | None = None
    box3d: tuple[float, ...] | None = None
    propagate: bool = False


def _parse_object(entry, where: str, index: int) -> ObjectPrompt:
    if not isinstance(entry, dict):
        raise ImedsamError(f"{where}: each object is a mapping with box / points / box3d, got {entry!r}")
    unknown = set(entry) - _OBJECT_KEYS
    if unknown:
        raise ImedsamError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_OBJECT_KEYS)}")
    if not any(k in entry for k in ("box", "points", "box3d")):
        raise ImedsamError(f"{where}: object {index + 1} has no prompt (box, points or box3d)")

    def numbers(key: str, length: int | tuple[int, ...]):
        value = entry.get(key)
        if value is None:
            return None
        lengths = (length,) if isinstance(length, int) else length
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ImedsamError(f"{where}: {key} must be numbers, got {value!r}") from None
        if key == "points":
            if arr.ndim != 2 or arr.shape[1] not in lengths:
                raise ImedsamError(f"{where}: points must be a list of [x, y, label] (2-D) or [i, j, k, label] "
                                   f"(volumes), got {value!r}")
            return tuple(tuple(float(v) for v in row) for row in arr)
        if arr.shape != (lengths[0],):
            raise ImedsamError(f"{where}: {key} must be {lengths[0]} numbers, got {value!r}")
        return tuple(float(v) for v in arr)

    label = entry.get("label", index + 1)
    if not isinstance(label, int) or isinstance(label, bool) or not 1 <= label <= 65535:
        raise ImedsamError(f"{where}: label must be an integer in 1..65535, got {label!r}")
    return ObjectPrompt(label=label, box=numbers("box", 4), points=numbers("points", (3, 4)),
                        box3d=numbers("box3d", 6), propagate=bool(entry.get("propagate", False)))


def load_prompt_file(path: str | Path) -> dict[str, list[ObjectPrompt]]:
    """Read and check a prompt file (module docstring): case name -> its objects. Errors name the file and case."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise ImedsamError(f"--prompts {p}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ImedsamError(f"--prompts {p}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ImedsamError(f"--prompts {p}: expected a mapping of case name -> prompts (see imedsam predict --help)")
    out = {}
    for name, value in raw.items():
        entries = value if isinstance(value, list) else [value]
        out[str(name)] = [_parse_object(e, f"--prompts {p}: case {name!r}", i) for i, e in enumerate(entries)]
    return out


def prompts_from_labels(labels: np.ndarray, *, propagate: bool = False) -> list[ObjectPrompt]:
    """One object per label value present in a 2-D (H, W) or 3-D (D, H, W) label map, prompted with its tight
    box (3-D: voxel indices i, j, k; with ``propagate`` the box is cut to its middle slice, to be followed)."""
    objects = []
    for value in (int(v) for v in np.unique(labels) if v > 0):
        idx = np.nonzero(labels == value)
        if labels.ndim == 2:
            ys, xs = idx
            objects.append(ObjectPrompt(value, box=(float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                    float(ys.max() + 1))))
            continue
        ks, js, is_ = idx
        k0, k1 = int(ks.min()), int(ks.max()) + 1
        if propagate:
            mid = int(np.unique(ks)[(len(np.unique(ks)) - 1) // 2])
            on = ks == mid
            box3d = (float(is_[on].min()), float(js[on].min()), float(mid), float(is_[on].max() + 1),
                     float(js[on].max() + 1), float(mid + 1))
        else:
            box3d = (float(is_.min()), float(js.min()), float(k0), float(is_.max() + 1), float(js.max() + 1),
                     float(k1))
        objects.append(ObjectPrompt(value, box3d=box3d, propagate=propagate))
    return objects


def list_cases(folder: str | Path) -> list[tuple[str, Path]]:
    """(name, path) of every case of ``folder``, sorted by name; names must be unique."""
    from imedsam.io import SUPPORTED_SUFFIXES
    from imedsam.io.atomic import full_suffix
    from imedsam.io.dicom import is_dicom_file

    root = Path(folder)
    if not root.is_dir():
        raise ImedsamError(f"-i {root}: not a folder; give the folder of images / volumes to predict")
    cases: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if any(f.is_file() and (f.suffix.lower() == ".dcm" or is_dicom_file(f)) for f in path.iterdir()):
                name = path.name
            else:
                continue
        else:
            suffix = full_suffix(path)
            if suffix not in SUPPORTED_SUFFIXES and not is_dicom_file(path):
                continue
            name = path.name[: len(path.name) - len(suffix)] if suffix else path.name
        if name in cases:
            raise ImedsamError(f"-i {root}: two cases are named {name!r} ({cases[name].name}, {path.name}); "
                               "rename one")
        cases[name] = path
    if not cases:
        raise ImedsamError(f"-i {root}: no image, volume or DICOM series in it")
    return sorted(cases.items())


def output_path(out_dir: Path, name: str, source: Path, is_volume: bool) -> Path:
    """Where a case's label map goes (module docstring)."""
    from imedsam.io.atomic import full_suffix

    if not is_volume:
        return out_dir / f"{name}.png"
    suffix = full_suffix(source) if source.is_file() else ""
    return out_dir / f"{name}{suffix if suffix in _VOLUME_OUT else '.nii.gz'}"


def _is_volume(path: Path) -> bool:
    """A DICOM series folder or a volume file (by suffix) is a volume; images and single DICOM files are 2-D."""
    from imedsam.io import VOLUME_SUFFIXES
    from imedsam.io.atomic import full_suffix

    return path.is_dir() or full_suffix(path) in VOLUME_SUFFIXES


def _find_label_file(folder: Path, name: str) -> Path:
    from imedsam.io.atomic import full_suffix

    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name[: len(path.name) - len(full_suffix(path))] == name:
            return path
    raise ImedsamError(f"--boxes-from {folder}: no label map named {name}.* for this case")


@dataclass
class FolderSettings:
    """What ``predict_folder`` does besides the prompts (the CLI's options)."""

    window: object = None
    axis: str = "k"
    multimask: bool = False
    min_component: int = 0
    overwrite: bool = False
    propagate: bool = False  # --boxes-from on volumes: follow from the middle slice


def _predict_case(seg, sample, objects: list[ObjectPrompt] | None, auto, settings: FolderSettings):
    """Label map (on the case's grid) and mean score of one case."""
    from imedsam import io

    if not sample.is_volume:
        rgb = io.to_display_rgb(sample, window=settings.window)
        seg.set_image(rgb)
        if auto is not None:
            from imedsam.infer.automatic import generate_masks, label_map

            masks = generate_masks(seg, auto)
            return label_map(masks, seg.original_size), (float(np.mean([m.score for m in masks])) if masks
                                                          else float("nan"))
        labels = np.zeros(seg.original_size, np.uint16)
        scores = []
        for obj in objects:
            if obj.box3d is not None or (obj.points and len(obj.points[0]) == 4):
                raise ImedsamError("a 3-D prompt (box3d, or [i, j, k, label] points) for a 2-D image")
            pts = np.asarray(obj.points, dtype=np.float64) if obj.points else None
            pred = seg.predict(box=obj.box, points=None if pts is None else pts[:, :2],
                               point_labels=None if pts is None else pts[:, 2].astype(np.int64),
                               multimask=settings.multimask, min_component=settings.min_component)
            best = int(np.argmax(pred.scores))
            labels[pred.masks[best]] = obj.label
            scores.append(float(pred.scores[best]))
        return labels, float(np.mean(scores))
    if auto is not None:
        raise ImedsamError("--auto: automatic mode is for 2-D images; prompt volumes with a prompt file or "
                           "--boxes-from")
    from imedsam.data.volume_prompts import SliceFrame, VolumePrompt, check_volume_prompt
    from imedsam.infer.volume import segment_volume_with

    frame = SliceFrame(settings.axis)
    display = io.to_display_volume(sample, window=settings.window)
    labels = np.zeros(display.shape, np.uint16)
    scores = []
    for obj in objects:
        if obj.box is not None or (obj.points and len(obj.points[0]) == 3):
            raise ImedsamError("a 2-D prompt (box, or [x, y, label] points) for a volume: use box3d / [i, j, k, "
                               "label]")
        prompt = VolumePrompt(box3d=obj.box3d, points=None if not obj.points else np.asarray(obj.points),
                              propagate=obj.propagate)
        check_volume_prompt(prompt, display.shape)
        mask, score = segment_volume_with(seg, display, prompt, frame, multimask=settings.multimask,
                                          min_component=settings.min_component)
        labels[mask] = obj.label
        scores.append(score)
    return labels, float(np.nanmean(scores)) if scores else float("nan")


def _write_csv(path: Path, rows: list[dict]) -> None:
    from imedsam.io.atomic import atomic_write

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case", "prompt", "objects", "score", "seconds", "status", "output"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def predict_folder(seg, in_dir: str | Path, out_dir: str | Path, *,
                   prompts: dict[str, list[ObjectPrompt]] | None = None, boxes_from: str | Path | None = None,
                   auto=None, settings: FolderSettings | None = None, progress: bool = True) -> dict:
    """Predict every case of ``in_dir`` into ``out_dir`` (module docstring) with the segmenter ``seg``; exactly one
    of ``prompts`` (from :func:`load_prompt_file`), ``boxes_from`` (a folder of label maps) and ``auto`` (an
    :class:`~imedsam.infer.automatic.AutoSettings`). Returns ``{"cases", "done", "skipped", "failed", "csv"}``."""
    from tqdm.auto import tqdm

    from imedsam import io
    from imedsam.data.samples import normalize_mask
    from imedsam.io.sample import require_finite

    settings = settings or FolderSettings()
    cases = list_cases(in_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    counts = {"done": 0, "skipped": 0, "failed": 0}
    targets = [output_path(out, name, path, _is_volume(path)) for name, path in cases]
    todo = [settings.overwrite or not t.exists() for t in targets]  # decided from the name: a skip reads nothing

    def load(name: str, path: Path):
        """Read a case and its prompts (run one case ahead in a reader thread, beside the model's work)."""
        sample = io.read(path)
        require_finite(sample.array, str(path))
        objects = None
        if prompts is not None:
            if name not in prompts:
                raise ImedsamError(f"no entry {name!r} in the prompt file")
            objects = prompts[name]
        elif boxes_from is not None:
            lab_path = _find_label_file(Path(boxes_from), name)
            lab = normalize_mask(io.read(lab_path).array, source=lab_path, ndim=sample.geometry.ndim)
            if tuple(lab.shape) != tuple(sample.geometry.shape):
                raise ImedsamError(f"{lab_path}: label map shape {lab.shape} differs from the image's "
                                   f"{tuple(sample.geometry.shape)}")
            objects = prompts_from_labels(lab, propagate=settings.propagate)
            if not objects:
                raise ImedsamError(f"{lab_path}: no labelled object to take a box from")
        return sample, objects

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imedsam-read")
    pending: dict[int, Future] = {}

    def read_ahead(i: int) -> None:
        nxt = next((j for j in range(i, len(cases)) if todo[j]), None)
        if nxt is not None and nxt not in pending:
            pending[nxt] = reader.submit(load, *cases[nxt])

    read_ahead(0)
    for i, (name, path) in enumerate(tqdm(cases, desc="predict", unit="case", disable=not progress)):
        start = time.perf_counter()
        kind = "auto" if auto is not None else ("labels" if boxes_from is not None else "prompts")
        row = {"case": name, "prompt": kind, "objects": "", "score": "", "seconds": "", "status": "",
               "output": targets[i].name}
        try:
            target = targets[i]
            if not todo[i]:
                row["status"] = "skipped (output exists; --overwrite to redo)"
                counts["skipped"] += 1
                rows.append(row)
                _write_csv(out / "predictions.csv", rows)
                continue
            read_ahead(i)
            future = pending.pop(i)
            read_ahead(i + 1)
            sample, objects = future.result()
            labels, score = _predict_case(seg, sample, objects, auto, settings)
            labels = labels.astype(np.uint8) if labels.max() <= 255 else labels
            if sample.is_volume:
                io.write_volume(target, labels, like=sample)
            else:
                io.write_mask(target, labels, binary_value=1)  # label values as they are
            row.update(objects=len(objects) if objects is not None else int(labels.max()),
                       score=round(score, 4) if np.isfinite(score) else "", status="ok")
            counts["done"] += 1
        except Exception as exc:  # one bad case is reported and the others go on
            row["status"] = f"error: {exc}".replace("\n", " ")
            counts["failed"] += 1
            log.warning("predict: %s failed: %s", name, exc)
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        _write_csv(out / "predictions.csv", rows)
    reader.shutdown(cancel_futures=True)
    return {"cases": len(cases), **counts, "csv": str((out / "predictions.csv").resolve())}
