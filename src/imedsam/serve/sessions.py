"""A session: one opened image or volume, its label map (one label value per object), the interaction of each
(slice, object, model) and an undo stack. Model work goes through a shared embedding cache keyed by
(session, slice, model, window), so a slice is encoded once however many prompts follow.

Conventions: slices are taken along the array's first axis (``k`` for NIfTI: ``SliceFrame("k")``); a 2-D image is
one slice. Boxes are ``(x0, y0, x1, y1)`` half-open and points ``(x, y)``, in the slice's pixels (column, row).
Labels are uint8: object ids 1..255, 0 is background; where objects overlap, the latest prompt wins.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from imedsam import io
from imedsam.data.volume_prompts import SliceFrame, VolumePrompt, check_volume_prompt, mask_box, propagate
from imedsam.errors import ImedsamError
from imedsam.infer.segmenter import ImageState, Interaction, Prediction, Segmenter
from imedsam.infer.volume import segment_volume_with, slice_predictor
from imedsam.io.sample import Sample
from imedsam.serve.cache import EmbeddingCache

FRAME = SliceFrame("k")
MAX_OBJECTS = 255
UNDO_DEPTH = 64


def is_volume_model(seg: Segmenter) -> bool:
    """A system that segments whole volumes from stacks of adjacent slices (MA-SAM), not slice by slice."""
    return hasattr(seg.system, "predict_volume")


def _refuse_volume_model(seg: Segmenter, what: str) -> None:
    if is_volume_model(seg):
        raise ImedsamError(f"{what}: this model segments whole volumes from stacks of adjacent slices; use automatic "
                           "mode (prompt-free models) or a 3-D box (box-prompted ones)")


@dataclass
class _Undo:
    planes: dict[int, np.ndarray]                        # slice -> its label plane before the change
    tracks: dict[tuple, list[Interaction]] = field(default_factory=dict)  # track -> history before the change


@dataclass
class Result:
    """What a model operation gives the client: the slice's label plane and, for one prediction, its facts."""

    slice: int
    labels: np.ndarray                 # (H, W) uint8 label plane of ``slice`` after the change
    score: float | None = None
    area: int | None = None
    uncertainty: np.ndarray | None = None
    changed_slices: list[int] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)


class Session:
    """One opened image or volume. Methods that call a model block: run them in a worker thread. One lock
    serialises the changes of a session; different sessions run in parallel."""

    def __init__(self, sample: Sample, name: str, cache: EmbeddingCache[ImageState], *,
                 dicom_headers: list | None = None) -> None:
        self.id = secrets.token_urlsafe(12)
        self.name = name
        self.sample = sample
        self.dicom_headers = dicom_headers
        self.is_volume = sample.is_volume
        self._cache = cache
        spatial = tuple(int(n) for n in sample.geometry.shape)
        self.shape = spatial if self.is_volume else (1, *spatial)     # (D, H, W)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self._tracks: dict[tuple, list[Interaction]] = {}
        self._undo: list[_Undo] = []
        self._displays: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.RLock()
        self.last_used = time.monotonic()

    # ------------------------------------------------------------------------------------------- facts
    def describe(self) -> dict:
        g = self.sample.geometry
        meta = self.sample.meta
        return {"id": self.id, "name": self.name, "kind": "volume" if self.is_volume else "image",
                "shape": list(self.shape), "slices": self.shape[0], "spacing": None if g.spacing is None
                else [float(v) for v in g.spacing], "modality": meta.get("modality"),
                "windows": ["auto", *io.CT_WINDOWS] if self._is_ct() else ["auto"],
                "download": self.download_formats()}

    def download_formats(self) -> list[str]:
        """``nifti`` (volumes), ``png`` (images, or one slice), ``dicom-seg`` (DICOM inputs, with highdicom)."""
        formats = ["nifti", "png"] if self.is_volume else ["png"]
        if self.dicom_headers is not None:
            try:
                import highdicom  # noqa: F401

                formats.append("dicom-seg")
            except ImportError:
                pass
        return formats

    def _is_ct(self) -> bool:
        return str(self.sample.meta.get("modality", "")).upper() == "CT" or (
            np.issubdtype(self.sample.array.dtype, np.signedinteger) and float(self.sample.array.min()) < -500)

    def check_slice(self, k: int) -> int:
        if not 0 <= int(k) < self.shape[0]:
            raise ImedsamError(f"slice {k} is outside this {'volume' if self.is_volume else 'image'} "
                               f"(0..{self.shape[0] - 1})")
        return int(k)

    # ---------------------------------------------------------------------------------------- display
    def display(self, window: str = "auto") -> np.ndarray:
        """The uint8 (D, H, W) volume or (1, H, W, 3) image the page shows and the model sees, for ``window``
        (``auto``: the file's window, else uint8 as is, else robust percentiles; or a CT window name)."""
        key = window or "auto"
        if key != "auto" and key not in io.CT_WINDOWS:
            raise ImedsamError(f"window {window!r}: use auto or one of {', '.join(io.CT_WINDOWS)}")
        with self.lock:
            if key not in self._displays:
                w = None if key == "auto" else key
                if self.is_volume:
                    shown = io.to_display_volume(self.sample, window=w)
                else:
                    shown = io.to_display_rgb(self.sample, window=w)[None]
                self._displays[key] = shown
                while len(self._displays) > 2:  # a CT volume per window is large: keep two
                    self._displays.popitem(last=False)
            self._displays.move_to_end(key)
            return self._displays[key]

    def plane_rgb(self, k: int, window: str) -> np.ndarray:
        """Slice ``k`` as the (H, W, 3) uint8 RGB the encoder takes."""
        plane = self.display(window)[self.check_slice(k)]
        return plane if plane.ndim == 3 else np.repeat(plane[..., None], 3, axis=2)

    def plane_gray_or_rgb(self, k: int, window: str) -> np.ndarray:
        """Slice ``k`` as shown: (H, W) gray for volumes, (H, W, 3) for colour images."""
        return self.display(window)[self.check_slice(k)]

    # ------------------------------------------------------------------------------------- embeddings
    def state(self, seg: Segmenter, model: str, k: int, window: str) -> ImageState:
        """The embedding of slice ``k`` for ``model`` (computed once; cached under the memory budget)."""
        def compute() -> ImageState:
            fork = seg.fork()
            fork.set_image(self.plane_rgb(k, window))
            return fork.image_state

        return self._cache.get((self.id, k, model, window or "auto"), compute)

    def is_embedded(self, model: str, k: int, window: str) -> bool:
        return (self.id, k, model, window or "auto") in self._cache

    # ------------------------------------------------------------------------------------ interaction
    def _set_object(self, k: int, obj: int, mask: np.ndarray) -> None:
        plane = self.labels[k]
        plane[plane == obj] = 0
        plane[mask] = obj

    def _push(self, undo: _Undo) -> None:
        self._undo.append(undo)
        del self._undo[:-UNDO_DEPTH]

    @staticmethod
    def check_object(obj: int) -> int:
        if not 1 <= int(obj) <= MAX_OBJECTS:
            raise ImedsamError(f"object {obj}: object ids are 1..{MAX_OBJECTS}")
        return int(obj)

    def interact(self, seg: Segmenter, model: str, k: int, obj: int, *, window: str = "auto",
                 box: tuple[float, float, float, float] | None = None, point: tuple[float, float] | None = None,
                 label: int = 1, uncertainty: bool = False) -> Result:
        """A box (which starts the object's interaction on this slice afresh) and/or a click (added to it); the
        object's mask on the slice becomes the new prediction."""
        k, obj = self.check_slice(k), self.check_object(obj)
        _refuse_volume_model(seg, "segment")
        with self.lock:
            key = (k, obj, model)
            before = self._tracks.get(key, [])
            fork = seg.fork()
            fork.set_image_state(self.state(seg, model, k, window), history=[] if box is not None else before)
            pred: Prediction = fork.refine(point, label, box=box, uncertainty=uncertainty)
            self._push(_Undo({k: self.labels[k].copy()}, {key: before}))
            self._tracks[key] = fork.history
            best = int(np.argmax(pred.scores))
            self._set_object(k, obj, pred.masks[best])
            return Result(k, self.labels[k].copy(), float(pred.scores[best]), int(pred.masks[best].sum()),
                          pred.uncertainty, [k], [obj])

    def auto(self, seg: Segmenter, model: str, k: int, *, window: str = "auto",
             settings=None) -> Result:
        """Automatic masks of slice ``k``, each a new object (ids after the largest in use)."""
        from imedsam.infer.automatic import generate_masks

        k = self.check_slice(k)
        if is_volume_model(seg):
            return self._auto_volume(seg, k, window)
        with self.lock:
            fork = seg.fork()
            fork.set_image_state(self.state(seg, model, k, window))
            masks = sorted(generate_masks(fork, settings), key=lambda m: -m.area)
            first = int(self.labels.max()) + 1
            if first + len(masks) - 1 > MAX_OBJECTS:
                masks = masks[:max(0, MAX_OBJECTS - first + 1)]
            self._push(_Undo({k: self.labels[k].copy()}))
            plane = self.labels[k]
            ids = []
            for n, m in enumerate(masks):
                plane[m.mask & (plane == 0)] = first + n
                ids.append(first + n)
            return Result(k, plane.copy(), objects=ids)

    def _auto_volume(self, seg: Segmenter, k: int, window: str) -> Result:
        """A prompt-free volume model (MA-SAM): every class of the whole volume at once, class c becoming object
        ``offset + c`` (``offset`` = the largest id in use, so a first run gives class ids), on the voxels no
        object holds yet."""
        if not self.is_volume:
            raise ImedsamError("auto: this model segments volumes from stacks of adjacent slices; open a volume")
        with self.lock:
            classes = self._predict_volume(seg, window)
            offset = int(self.labels.max())
            present = [int(c) for c in np.unique(classes) if 0 < c <= MAX_OBJECTS - offset]
            changed = [s for s in range(self.shape[0]) if np.isin(classes[s], present).any()]
            self._push(_Undo({s: self.labels[s].copy() for s in changed}))
            free = self.labels == 0
            for c in present:
                self.labels[(classes == c) & free] = offset + c
            return Result(k, self.labels[k].copy(), area=int(np.isin(classes, present).sum()),
                          changed_slices=changed, objects=[offset + c for c in present])

    def _predict_volume(self, seg: Segmenter, window: str, box3d: tuple[float, ...] | None = None) -> np.ndarray:
        """Class ids (D, H, W) of a volume model on this volume's display (prompt-free, or from one 3-D box)."""
        prompt = {} if box3d is None else {"box3d": box3d}
        probs = seg.system.predict_volume(self.display(window), device=seg.device, amp_dtype=seg.amp_dtype,
                                          **prompt)
        return probs.argmax(0).numpy()

    def _predictor_source(self, seg: Segmenter, model: str, window: str):
        fork = seg.fork()
        return fork, (lambda s: fork.set_image_state(self.state(seg, model, s, window)))

    def propagate(self, seg: Segmenter, model: str, k: int, obj: int, *, window: str = "auto",
                  on_slice: Callable[[int], None] | None = None) -> Result:
        """Follow object ``obj`` from slice ``k`` (where it must have a mask) through the volume, each next slice
        prompted with the box of the previous slice's mask, stopping where it vanishes (MedSAM's protocol)."""
        k, obj = self.check_slice(k), self.check_object(obj)
        if not self.is_volume:
            raise ImedsamError("propagate: this session is a 2-D image; propagation runs through a volume")
        _refuse_volume_model(seg, "propagate")
        with self.lock:
            start = self.labels[k] == obj
            if mask_box(start) is None:
                raise ImedsamError(f"propagate: object {obj} has no mask on slice {k}; segment it there first")
            fork, set_slice = self._predictor_source(seg, model, window)
            predict = slice_predictor(fork, self.display(window), FRAME, set_slice=set_slice)

            def step(s, box, points, labels):
                mask = predict(s, box, points, labels)
                if on_slice is not None:
                    on_slice(s)
                return mask

            masks = propagate(step, k, start, 0, self.shape[0])
            changed = sorted(s for s in masks if s != k)
            self._push(_Undo({s: self.labels[s].copy() for s in changed}))
            for s in changed:
                self._set_object(s, obj, masks[s])
            return Result(k, self.labels[k].copy(), area=int(sum(masks[s].sum() for s in masks)),
                          changed_slices=changed, objects=[obj])

    def box3d(self, seg: Segmenter, model: str, obj: int, box3d: tuple[float, ...], *, window: str = "auto",
              current: int = 0) -> Result:
        """Object ``obj`` from a 3-D box (i0, j0, k0, i1, j1, k1), half-open voxel indices: a box on every slice
        of its range (:func:`imedsam.data.volume_prompts.segment_volume`), or, for a box-prompted volume model
        (MA-SAM), the box's slices from sliding stacks, every foreground class counted as the object."""
        obj = self.check_object(obj)
        if not self.is_volume:
            raise ImedsamError("box3d: this session is a 2-D image; draw a box on it instead")
        prompt = VolumePrompt(box3d=tuple(float(v) for v in box3d))
        check_volume_prompt(prompt, self.shape)
        with self.lock:
            if is_volume_model(seg):  # the box-prompted MA-SAM: the box's slices from stacks, every class as one
                mask, score = self._predict_volume(seg, window, prompt.box3d) > 0, None
            else:
                fork, set_slice = self._predictor_source(seg, model, window)
                mask, score = segment_volume_with(fork, self.display(window), prompt, FRAME, set_slice=set_slice)
            changed = [s for s in range(self.shape[0]) if mask[s].any() or (self.labels[s] == obj).any()]
            self._push(_Undo({s: self.labels[s].copy() for s in changed}))
            for s in changed:
                self._set_object(s, obj, mask[s])
            k = self.check_slice(current)
            return Result(k, self.labels[k].copy(), score=score, area=int(mask.sum()), changed_slices=changed,
                          objects=[obj])

    def clear(self, k: int, obj: int | None = None) -> Result:
        """Remove object ``obj`` (or every object) from slice ``k``; undoable."""
        k = self.check_slice(k)
        with self.lock:
            self._push(_Undo({k: self.labels[k].copy()},
                             {t: h for t, h in self._tracks.items() if t[0] == k and obj in (None, t[1])}))
            for t in [t for t in self._tracks if t[0] == k and obj in (None, t[1])]:
                del self._tracks[t]
            if obj is None:
                self.labels[k] = 0
            else:
                self.labels[k][self.labels[k] == self.check_object(obj)] = 0
            return Result(k, self.labels[k].copy())

    def undo(self, k: int) -> Result:
        """Undo the last change (of any slice); returns slice ``k``'s plane after it."""
        k = self.check_slice(k)
        with self.lock:
            if not self._undo:
                raise ImedsamError("nothing to undo")
            last = self._undo.pop()
            for s, plane in last.planes.items():
                self.labels[s] = plane
            for t, history in last.tracks.items():
                self._tracks[t] = history
            return Result(k, self.labels[k].copy(), changed_slices=sorted(last.planes))

    # ---------------------------------------------------------------------------------------- output
    def label_volume(self) -> np.ndarray:
        """The labels on the input's grid: (D, H, W) for volumes, (H, W) for images."""
        return self.labels if self.is_volume else self.labels[0]


class SessionStore:
    """Open sessions: at most ``max_sessions`` (least recently used closed first), each closed after
    ``ttl_s`` idle; closing drops its cached embeddings."""

    def __init__(self, cache: EmbeddingCache, max_sessions: int, ttl_s: float) -> None:
        self._cache, self.max_sessions, self.ttl_s = cache, int(max_sessions), float(ttl_s)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                self._forget(old)

    def get(self, session_id: str) -> Session:
        self.sweep()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise KeyError(session_id)
            self._sessions.move_to_end(session_id)
            session.last_used = time.monotonic()
            return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._forget(session)
        return session is not None

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [s for s in self._sessions.values() if now - s.last_used > self.ttl_s]
            for s in old:
                del self._sessions[s.id]
        for s in old:
            self._forget(s)

    def _forget(self, session: Session) -> None:
        self._cache.drop(lambda key: key[0] == session.id)
