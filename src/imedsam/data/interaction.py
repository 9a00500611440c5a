"""Simulated users: the prompt protocols of evaluation and validation, run on any promptable system.

Protocols (``imedsam evaluate --prompt ...``; the same code validates during training):

* ``box``: the case's box (the tight half-open box of the ground truth, or the dataset's jittered box), one pass.
* ``points:N``: N random clicks drawn from the ground truth as SAM-Med2D's test (systems.md §B.6): N = 1 is one
  foreground pixel; N > 1 is ``N // 2`` foreground and ``N - N // 2`` background pixels, uniformly without
  replacement, from a generator seeded by ``(seed, case index)``; one pass with the points alone. The drawn
  points can be written to a JSON file and read back (:func:`save_prompts`, :func:`load_prompts`), so that two
  models see the same prompts.
* ``clicks:N``: the standard interactive protocol (as RITM / SimpleClick): start from an empty prediction; each
  click goes to the interior-most pixel (largest Euclidean distance to the region's border, the image border
  counting as border) of the largest error region (8-connected components of false negatives and of false
  positives, the larger by pixel count; ties: the lowest label), labelled 1 for a false negative and 0 for a false
  positive; clicks accumulate, and a system that takes mask prompts also gets its previous low-resolution logits.
  The Dice after every click is recorded, and NoC@85 / NoC@90: the number of clicks after which Dice first
  reaches 0.85 / 0.90, capped at N (a case that never reaches it within N clicks counts N).
  Deterministic (no random choice).

Predictions are made on the ground truth's grid of the case (``EvalCase.native_grid``); the box and points
protocols may also decode other grids from the same embedding, and take flip test-time augmentation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from imedsam.data.cases import EvalCase
from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write
from imedsam.models.views import FlipView, encode_views, mean_over_views
from imedsam.runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["CaseResult", "Protocol", "draw_points", "encode_case", "load_prompts", "next_click", "noc",
           "parse_protocol", "run_case", "save_prompts"]

_EIGHT = np.ones((3, 3), dtype=bool)
NOC_THRESHOLDS = (0.85, 0.90)


@dataclass(frozen=True)
class Protocol:
    """A prompt protocol: ``kind`` in ``box``, ``points``, ``clicks`` and its count ``n`` (0 for box)."""

    kind: str
    n: int = 0

    @property
    def name(self) -> str:
        return self.kind if self.kind == "box" else f"{self.kind}:{self.n}"

    @property
    def prompt_types(self) -> tuple[str, ...]:
        return ("box",) if self.kind == "box" else ("points",)


def parse_protocol(text: str, argument: str = "--prompt") -> Protocol:
    """``box``, ``points:N`` or ``clicks:N`` (N >= 1)."""
    spec = str(text).strip().lower()
    if spec == "box":
        return Protocol("box")
    kind, _, count = spec.partition(":")
    if kind in ("points", "clicks"):
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n >= 1:
            return Protocol(kind, n)
    raise ImedsamError(f"{argument}: expected box, points:N or clicks:N with N >= 1 (e.g. points:3, clicks:5), "
                       f"got {text!r}")


def draw_points(gt: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SAM-Med2D's random test points (module docstring): ``(n, 2)`` float xy pixel indices and ``(n,)`` labels,
    foreground first. A region with fewer pixels than asked gives what it has (at least one foreground)."""
    gt = np.asarray(gt, dtype=bool)
    n_fg = 1 if n == 1 else n // 2
    n_bg = n - n_fg
    fg, bg = np.argwhere(gt), np.argwhere(~gt)
    if len(fg) == 0:
        raise ImedsamError("points protocol: the ground truth is empty; a foreground click needs an object")
    pick_fg = fg[rng.choice(len(fg), size=min(n_fg, len(fg)), replace=False)]
    pick_bg = bg[rng.choice(len(bg), size=min(n_bg, len(bg)), replace=False)] if len(bg) else bg[:0]
    rc = np.concatenate([pick_fg, pick_bg])
    labels = np.concatenate([np.ones(len(pick_fg), np.int64), np.zeros(len(pick_bg), np.int64)])
    return rc[:, ::-1].astype(np.float64), labels


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The next corrective click (module docstring): ``((x, y), label)``, or None when ``pred == gt``."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ImedsamError(f"next_click: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    best = None  # (size, region mask, label)
    for label, error in ((1, gt & ~pred), (0, pred & ~gt)):
        comps, count = ndimage.label(error, structure=_EIGHT)
        if count == 0:
            continue
        sizes = np.bincount(comps.ravel(), minlength=count + 1)[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), comps == k + 1, label)
    if best is None:
        return None
    region = np.pad(best[1], 1)  # the image border counts as the region's border
    dist = ndimage.distance_transform_edt(region)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([float(x), float(y)]), best[2]


def noc(dice_per_click: list[float], threshold: float) -> int:
    """Clicks needed to reach ``threshold`` Dice: the first 1-based click index, capped at ``len`` (never reached
    within the clicks counts all of them)."""
    for i, d in enumerate(dice_per_click, start=1):
        if d >= threshold:
            return i
    return len(dice_per_click)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = int(pred.sum()) + int(gt.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & gt).sum()) / s


@dataclass
class CaseResult:
    """What a protocol produced for one case.

    Attributes:
        preds: one (H_o, W_o) bool prediction per requested grid (clicks: the native grid, after the last click).
        logits: the matching float32 logits (views averaged).
        prompt: the prompts used, JSON-able (``box``; ``points`` + ``labels``).
        dice_per_click: clicks protocol: Dice (at the native grid) after each click.
    """

    preds: list[np.ndarray]
    logits: list[np.ndarray]
    prompt: dict = field(default_factory=dict)
    dice_per_click: list[float] | None = None


def _decode_grids(system, encoded, prompts, sizes, seed) -> list[torch.Tensor]:
    out = []
    for s in sizes:
        res = system.decode(encoded.embedding, encoded.prepared, prompts, size=s, seed=seed)
        out.append(encoded.view.restore(res.logits[0, 0].float()))
    return out


@torch.inference_mode()
def run_case(system, case: EvalCase, protocol: Protocol, *, sizes: list[tuple[int, int] | None] | None = None,
             device: torch.device, amp_dtype=None, seed: int = 0, index: int = 0,
             views: tuple[FlipView, ...] = (FlipView(),), prompt: dict | None = None,
             encoded: list | None = None) -> CaseResult:
    """Run ``protocol`` on one case (module docstring); ``index`` seeds the case's random points; ``prompt``
    (from :func:`load_prompts`) replaces drawing them; ``encoded`` (from :func:`encode_case`) reuses the views'
    embeddings, so several protocols cost one encoder pass per view."""
    grids = [case.native_grid if s is None else tuple(s) for s in (sizes or [None])]
    if encoded is None:
        encoded = encode_case(system, case, views, device=device, amp_dtype=amp_dtype)
    if protocol.kind == "clicks":
        return _run_clicks(system, case, protocol.n, encoded[0], device=device, amp_dtype=amp_dtype, seed=seed)
    record: dict
    if protocol.kind == "box":
        box, points, labels = case.prompt_box(), None, None
        record = {"box": [float(v) for v in box]}
    else:
        if prompt is not None:
            points = np.asarray(prompt["points"], dtype=np.float64).reshape(-1, 2)
            labels = np.asarray(prompt["labels"], dtype=np.int64).reshape(-1)
        else:
            rng = np.random.default_rng([int(seed), int(index), protocol.n])
            points, labels = draw_points(case.gt, protocol.n, rng)
        box = None
        record = {"points": points.tolist(), "labels": labels.tolist()}
    logits: list[list[torch.Tensor]] = [[] for _ in grids]
    with autocast(device, amp_dtype):
        for view in encoded:
            prompts = view.prompts(box, points, labels)
            for i, lg in enumerate(_decode_grids(system, view, prompts, grids, seed)):
                logits[i].append(lg)
    means = [mean_over_views(lg).cpu().numpy() for lg in logits]
    return CaseResult(preds=[m > 0 for m in means], logits=means, prompt=record)


@torch.inference_mode()
def encode_case(system, case: EvalCase, views: tuple[FlipView, ...] = (FlipView(),), *, device: torch.device,
                amp_dtype=None) -> list:
    """The case's image embedded once per view (:func:`imedsam.models.views.encode_views`)."""
    with autocast(device, amp_dtype):
        return encode_views(system, case.image, views, device)


def _run_clicks(system, case: EvalCase, n: int, encoded, *, device, amp_dtype, seed: int) -> CaseResult:
    grid = case.native_grid
    gt = case.gt_on(grid)
    uses_mask = "mask" in getattr(system, "prompt_types", ())
    points: list[np.ndarray] = []
    labels: list[int] = []
    pred = np.zeros(grid, dtype=bool)
    logits = np.full(grid, -1.0, dtype=np.float32)
    low_res = None
    dice: list[float] = []
    if encoded.view.axes:
        raise ImedsamError("clicks protocol: runs on the image itself, not a flipped view")
    with autocast(device, amp_dtype):
        for _ in range(n):
            click = next_click(pred, gt)
            if click is None:  # perfect already: later clicks change nothing
                dice.append(dice[-1] if dice else 1.0)
                continue
            points.append(click[0] * (np.array(case.gt.shape[::-1]) / np.array(grid[::-1])))
            labels.append(click[1])
            prompts = encoded.prompts(None, np.stack(points), np.asarray(labels, dtype=np.int64))
            if uses_mask and low_res is not None:
                prompts.mask_input = low_res
            res = system.decode(encoded.embedding, encoded.prepared, prompts, size=grid, seed=seed)
            low_res = None if res.low_res_logits is None else res.low_res_logits[:, :1].to(encoded.embedding.dtype)
            logits = res.logits[0, 0].float().cpu().numpy()
            pred = logits > 0
            dice.append(_dice(pred, gt))
    record = {"points": [p.tolist() for p in points], "labels": labels}
    return CaseResult(preds=[pred], logits=[logits], prompt=record, dice_per_click=dice)


def save_prompts(path: str | Path, prompts: dict[str, dict], protocol: Protocol, seed: int) -> Path:
    """Write ``{case id: prompt}`` with the protocol and seed that drew them (JSON, atomic)."""
    data = {"protocol": protocol.name, "seed": int(seed), "cases": prompts}
    return atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def load_prompts(path: str | Path, protocol: Protocol, case_ids: list[str]) -> dict[str, dict]:
    """Read prompts written by :func:`save_prompts`; refuses another protocol or missing cases."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        cases = data["cases"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImedsamError(f"--prompts: cannot read {path} as a prompts file of imedsam evaluate ({exc})") from None
    if data.get("protocol") != protocol.name:
        raise ImedsamError(f"--prompts: {path} holds {data.get('protocol')!r} prompts, not {protocol.name!r}")
    missing = [c for c in case_ids if c not in cases]
    if missing:
        raise ImedsamError(f"--prompts: {path} has no prompt for {len(missing)} case(s), e.g. {missing[0]!r}")
    return cases
