"""Automatic mode: masks of everything in an image without a prompt, from a grid of point prompts.

SAM's automatic mask generator logic (Kirillov et al. 2023), on any promptable system:

1. a regular grid of ``points_per_side`` x ``points_per_side`` foreground points over the image (cell centres);
2. each point prompts the system alone; systems with SAM's decoder answer ``points_per_batch`` points in one
   batched decoder call with their 3 multimask outputs, others (the implicit decoder) one point at a time;
3. a candidate survives when its predicted IoU (SAM) or confidence (implicit decoder) is at least
   ``pred_iou_thresh`` and its **stability score** at least ``stability_score_thresh``: the IoU between the
   mask thresholded at logit ``+offset`` and at ``-offset`` (a mask that barely changes is stable);
4. greedy non-maximum suppression on the candidates' boxes (IoU above ``box_nms_thresh`` with a better-scored
   one removes a candidate), scores = predicted IoU;
5. optionally, connected regions and holes smaller than ``min_region_area`` pixels are removed from every mask,
   and masks smaller than it dropped.

The result is a list of :class:`AutoMask` (best first) and an instance label map (:func:`label_map`: 0
background, 1..K by decreasing area, so a small object painted later stays visible inside a large one).
Deterministic: no random choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from imedsam.errors import ImedsamError
from imedsam.models.base import Prompts
from imedsam.sam.prepare import restore_logits, to_input_coords

log = logging.getLogger(__name__)

__all__ = ["AutoMask", "AutoSettings", "generate_masks", "label_map", "point_grid"]


@dataclass(frozen=True)
class AutoSettings:
    """The automatic mask generator's parameters (SAM's defaults, except the grid: 16 per side on CPU)."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_region_area: int = 0

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ImedsamError(f"--points-per-side and points_per_batch must be >= 1, got {self.points_per_side}, "
                               f"{self.points_per_batch}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ImedsamError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.min_region_area < 0:
            raise ImedsamError(f"--min-area: must be >= 0, got {self.min_region_area}")


@dataclass
class AutoMask:
    """One automatic mask: (H, W) bool on the original grid, its score, stability and half-open xyxy box."""

    mask: np.ndarray
    score: float
    stability: float
    box: tuple[float, float, float, float]
    point: tuple[float, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def point_grid(n: int, size: tuple[int, int]) -> np.ndarray:
    """``n * n`` (x, y) points at the cell centres of an ``n x n`` grid over an image of ``size = (H, W)``."""
    h, w = size
    offsets = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(offsets * w, offsets * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def stability_score(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """``|logits > +offset| / |logits > -offset|`` per mask of ``(N, H, W)`` (1 for masks empty at both)."""
    high = (logits > offset).flatten(1).sum(1).float()
    low = (logits > -offset).flatten(1).sum(1).float()
    return torch.where(low > 0, high / low.clamp_min(1), torch.ones_like(low))


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) half-open xyxy boxes (zeros for empty masks)."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    box = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(masks.flatten(1).any(1)[:, None], box, torch.zeros_like(box))


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Greedy NMS: indices kept, best score first (a box is dropped when its IoU with a kept one exceeds
    ``threshold``)."""
    order = torch.argsort(scores, descending=True, stable=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp_min(0).prod(1)
        iou = inter / (area[i] + area - inter).clamp_min(1e-9)
        suppressed |= iou > threshold
    return keep


def _clean(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove islands and fill holes smaller than ``min_area`` pixels (8-connected islands, 4-connected holes)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        mask = (sizes >= min_area)[labels] & mask
    holes, m = ndimage.label(~mask)
    if m:
        sizes = np.bincount(holes.ravel(), minlength=m + 1)
        border = set(np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])).tolist())
        small = np.array([i not in border and s < min_area for i, s in enumerate(sizes)])
        small[0] = False
        mask = mask | small[holes]
    return mask


def _candidates_sam(segmenter, points: np.ndarray, min_score: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Batched multimask decoding of points: the candidates scoring at least ``min_score``, as logits (K, H, W)
    on the original grid (only those are resized), scores (K,), points (K, 2)."""
    system, encoded = segmenter.system, segmenter._encoded[0]
    coords = torch.as_tensor(to_input_coords(points, encoded.prepared), dtype=torch.float32,
                             device=encoded.embedding.device)
    prompts = Prompts(points=coords[:, None, :], labels=torch.ones(len(points), 1, dtype=torch.long,
                                                                    device=coords.device))
    low_res, iou = system.sam_masks(encoded.embedding, prompts, multimask=True)
    k = low_res.shape[1]
    low_res, iou = low_res.flatten(0, 1), iou.float().flatten()
    idx = torch.nonzero(iou >= min_score).flatten()
    logits = restore_logits(low_res[idx, None], encoded.prepared)[:, 0]  # (K, H, W)
    return logits, iou[idx], np.repeat(points, k, axis=0)[idx.cpu().numpy()]


def _candidates_any(segmenter, points: np.ndarray, min_score: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                np.ndarray]:
    logits, scores = [], []
    for p in points:
        pred = segmenter.predict(points=p[None], point_labels=np.ones(1, np.int64))
        logits.append(torch.from_numpy(pred.logits[0]))
        scores.append(float(pred.scores[0]))
    return torch.stack(logits), torch.tensor(scores), points


@torch.inference_mode()
def generate_masks(segmenter, settings: AutoSettings | None = None) -> list[AutoMask]:
    """Automatic masks of the image set on ``segmenter`` (an :class:`imedsam.infer.segmenter.Segmenter`)."""
    from imedsam.models.sam import SamDecoding
    from imedsam.runtime import autocast

    s = settings or AutoSettings()
    segmenter._require_image()
    system = segmenter.system
    if "points" not in system.prompt_types:
        raise ImedsamError(f"--auto: model {system.name!r} takes no point prompts; automatic mode needs a "
                           "promptable model")
    size = segmenter.original_size
    grid = point_grid(s.points_per_side, size)
    batched = isinstance(system, SamDecoding) and len(segmenter._encoded) == 1
    if not batched:
        log.info("automatic mode on %s: %d points decoded one at a time", system.name, len(grid))
    kept_logits, kept_scores, kept_stab, kept_points = [], [], [], []
    for start in range(0, len(grid), s.points_per_batch):
        points = grid[start:start + s.points_per_batch]
        with autocast(segmenter.device, segmenter.amp_dtype):
            logits, scores, pts = (_candidates_sam if batched else _candidates_any)(segmenter, points,
                                                                                     s.pred_iou_thresh)
        logits = logits.float()
        stab = stability_score(logits, s.stability_score_offset)
        ok = (scores >= s.pred_iou_thresh) & (stab >= s.stability_score_thresh) & (logits > 0).flatten(1).any(1)
        idx = torch.nonzero(ok).flatten()
        kept_logits.append((logits[idx] > 0).cpu())
        kept_scores.append(scores[idx].cpu())
        kept_stab.append(stab[idx].cpu())
        kept_points.append(pts[idx.cpu().numpy()])
    masks = torch.cat(kept_logits) if kept_logits else torch.zeros((0, *size), dtype=torch.bool)
    if len(masks) == 0:
        return []
    scores, stabs, points = torch.cat(kept_scores), torch.cat(kept_stab), np.concatenate(kept_points)
    keep = box_nms(_boxes(masks), scores, s.box_nms_thresh)
    out = []
    for i in keep:
        mask = masks[i].numpy()
        if s.min_region_area > 0:
            mask = _clean(mask, s.min_region_area)
            if mask.sum() < s.min_region_area:
                continue
        box = _boxes(torch.from_numpy(mask)[None])[0].tolist()
        out.append(AutoMask(mask=mask, score=float(scores[i]), stability=float(stabs[i]), box=tuple(box),
                            point=tuple(float(v) for v in points[i])))
    if s.min_region_area > 0 and len(out) > 1:  # cleaning moved boxes: suppress again
        boxes = torch.tensor([m.box for m in out])
        out = [out[i] for i in box_nms(boxes, torch.tensor([m.score for m in out]), s.box_nms_thresh)]
    return out


def label_map(masks: list[AutoMask], size: tuple[int, int]) -> np.ndarray:
    """Instance label map (H, W): 0 background, masks painted by decreasing area with ids 1..K (uint16)."""
    labels = np.zeros(size, dtype=np.uint16)
    for k, m in enumerate(sorted(masks, key=lambda m: -m.area), start=1):
        labels[m.mask] = k
    return labels
