"""Evaluation protocols: predict every case of a split from its ground-truth box and score it.

Protocol (written into every report): the prompt is the tight box of the ground-truth mask at the ORIGINAL
resolution (``--box-jitter`` adds seeded expansion), mapped once into the encoder frame; the prediction is made
DIRECTLY on the requested grid (the implicit decoder evaluates that grid; discrete decoders resize their native
logits once) and thresholded at logit 0; the ground truth is resized to that grid with nearest-neighbour
interpolation (or read at the grid's resolution from ``--gt-dir``); with ``--min-component N`` the predicted
components smaller than N pixels (8-connected, at the output grid) are removed first; metrics follow
:func:`imedsam.evaluate.metrics.binary_metrics`, with spacing scaled to the grid. Every row also records
``gt_components``, the number of 8-connected components of the ground truth (original resolution) holding at
least 5 % of its foreground: a box around several separate objects is ambiguous for a single-mask prompt, and
reports break the scores down by this count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imedsam.data.prompts import box_from_mask
from imedsam.infer.postprocess import count_components, remove_small_components
from imedsam.infer.prepare import prepare_image, to_input_coords
from imedsam.models.base import Prompts
from imedsam.runtime import autocast

log = logging.getLogger(__name__)

GT_COMPONENT_FRACTION = 0.05  # ground-truth components under 5 % of the object are not counted (specks)


@dataclass
class EvalCase:
    """One prompt target: an image, a binary ground truth on the same grid, and its pixel spacing (or None)."""

    case_id: str
    image: np.ndarray  # (H, W, 3) uint8 display RGB
    gt: np.ndarray  # (H, W) bool
    spacing: tuple[float, float] | None = None
    gt_native: np.ndarray | None = None  # optional original-resolution ground truth at another grid


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) mask to ``size`` (pixel-centre sampling, as F.interpolate 'nearest-exact')."""
    if tuple(mask.shape) == tuple(size):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy() > 0.5


@torch.inference_mode()
def predict_case(system, case: EvalCase, *, size: tuple[int, int] | list | None, device: torch.device,
                 amp_dtype=None, box: np.ndarray | None = None, seed: int = 0, min_component: int = 0):
    """Predict one case's mask from its GT box on one grid or several; returns (H_o, W_o) bool (or a list).

    The image is embedded once; every grid is decoded from that embedding.
    """
    sizes = size if isinstance(size, list) else [size]
    prepared = prepare_image(case.image, system.preprocess, device)
    with autocast(device, amp_dtype):
        embedding = system.encode(prepared.tensor, valid_hw=prepared.input_size)
        b = box_from_mask(case.gt) if box is None else box
        prompts = Prompts(boxes=torch.as_tensor(to_input_coords(b, prepared), dtype=torch.float32,
                                                device=device).view(1, 4))
        preds = [remove_small_components((system.decode(embedding, prepared, prompts, size=s, seed=seed)
                                          .logits[0, 0].float() > 0).cpu().numpy(), min_component)
                 for s in sizes]
    return preds if isinstance(size, list) else preds[0]


def evaluate_cases(system, cases, *, sizes: list[tuple[int, int] | None], device: torch.device, amp_dtype=None,
                   seed: int = 0, progress: bool = True, min_component: int = 0) -> list[dict]:
    """Score every case at every requested grid (``None`` = native). One row per (case, grid)."""
    from imedsam.evaluate.metrics import binary_metrics

    rows = []
    system.eval()
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, leave=False):
        if not case.gt.any():
            log.warning("%s: empty ground truth, no box prompt possible; skipped", case.case_id)
            continue
        grids = [tuple(size) if size is not None else tuple(case.gt.shape) for size in sizes]
        preds = predict_case(system, case, size=grids, device=device, amp_dtype=amp_dtype, seed=seed,
                             min_component=min_component)
        n_components = count_components(case.gt, GT_COMPONENT_FRACTION)
        for grid, pred in zip(grids, preds):
            gt = resize_nearest(case.gt, grid)
            spacing = None
            if case.spacing is not None:
                spacing = (case.spacing[0] * case.gt.shape[0] / grid[0], case.spacing[1] * case.gt.shape[1] / grid[1])
            metrics = binary_metrics(pred, gt, spacing=spacing)
            rows.append({"case": case.case_id, "grid": f"{grid[0]}x{grid[1]}", "height": grid[0], "width": grid[1],
                         **{k: (float(v) if v is not None else None) for k, v in metrics.items()},
                         "gt_components": n_components})
    return rows
