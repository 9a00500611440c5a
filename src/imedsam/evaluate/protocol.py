"""Evaluation protocols: predict every case of a split from its ground-truth box and score it.

Protocol (written into every report): the prompt is the tight box of the ground-truth mask at the dataset image's
resolution (``--box-jitter LO,HI`` expands each side by a seeded U[LO, HI) pixels), mapped once into the encoder
frame; the prediction is made DIRECTLY on the requested grid (the implicit decoder evaluates that grid; discrete
decoders resize their native logits once) and thresholded at logit 0; the ground truth is resized to that grid
with nearest-neighbour interpolation, from the dataset mask or, with ``--gt-dir``, from the mask of the same name
in that folder (e.g. the original-resolution masks of a down-sampled dataset; ``native`` is then that mask's
grid); with ``--tta`` the logits are the mean over the image and its flipped copies (prompt flipped with it,
logits flipped back); with ``--min-component N`` the predicted components smaller than N pixels (8-connected, at
the output grid) are removed first; metrics follow :func:`imedsam.evaluate.metrics.binary_metrics`, with spacing
scaled to the grid. Every row also records ``gt_components``, the number of 8-connected components of the dataset
ground truth holding at least 5 % of its foreground: a box around several separate objects is ambiguous for a
single-mask prompt, and reports break the scores down by this count."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imedsam.data.prompts import box_from_mask
from imedsam.infer.postprocess import count_components, remove_small_components
from imedsam.infer.tta import FlipView, encode_views, mean_over_views
from imedsam.runtime import autocast

log = logging.getLogger(__name__)

GT_COMPONENT_FRACTION = 0.05  # ground-truth components under 5 % of the object are not counted (specks)


@dataclass
class EvalCase:
    """One prompt target: an image, a binary ground truth on the same grid, and its pixel spacing (or None).

    ``box`` is the prompt (half-open xyxy in the image's pixels; default the tight box of ``gt``). ``gt_native`` is
    an optional ground truth of the same object on another (usually finer) grid of the same field of view, e.g.
    the original-resolution mask of a down-sampled dataset (``--gt-dir``): when given, it is what predictions are
    scored against and its grid is the case's native grid.
    """

    case_id: str
    image: np.ndarray  # (H, W, 3) uint8 display RGB
    gt: np.ndarray  # (H, W) bool
    spacing: tuple[float, float] | None = None
    gt_native: np.ndarray | None = None  # (H_n, W_n) bool
    box: np.ndarray | None = None
    stem: str | None = None  # the dataset file stem the case comes from
    class_id: int = 1
    slice_index: int | None = None

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple((self.gt if self.gt_native is None else self.gt_native).shape)

    def prompt_box(self) -> np.ndarray:
        return box_from_mask(self.gt) if self.box is None else np.asarray(self.box, dtype=np.float64)

    def gt_on(self, grid: tuple[int, int]) -> np.ndarray:
        """The ground truth on ``grid``: ``gt_native`` (else ``gt``) resized with nearest-neighbour."""
        return resize_nearest(self.gt if self.gt_native is None else self.gt_native, grid)


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) mask to ``size`` (pixel-centre sampling, as F.interpolate 'nearest-exact')."""
    if tuple(mask.shape) == tuple(size):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy() > 0.5


@torch.inference_mode()
def view_logits(system, case: EvalCase, *, sizes: list[tuple[int, int]], device: torch.device, amp_dtype=None,
                seed: int = 0, views: tuple[FlipView, ...] = (FlipView(),)) -> list[list[torch.Tensor]]:
    """Per grid of ``sizes``, the (H_o, W_o) float logits of every view (:mod:`imedsam.infer.tta`), each restored
    to the image's orientation. Every view is embedded once; every grid is decoded from that embedding."""
    box = case.prompt_box()
    logits = [[] for _ in sizes]
    with autocast(device, amp_dtype):
        for encoded in encode_views(system, case.image, views, device):
            prompts = encoded.prompts(box)
            for i, s in enumerate(sizes):
                out = system.decode(encoded.embedding, encoded.prepared, prompts, size=s, seed=seed)
                logits[i].append(encoded.view.restore(out.logits[0, 0].float()))
    return logits


def predict_case(system, case: EvalCase, *, size: tuple[int, int] | list | None, device: torch.device,
                 amp_dtype=None, seed: int = 0, min_component: int = 0, views: tuple[FlipView, ...] = (FlipView(),)):
    """Predict one case's mask from its prompt box on one grid or several; returns (H_o, W_o) bool (or a list).

    With several views (flip test-time augmentation) the views' logits are averaged before thresholding at 0.
    """
    sizes = size if isinstance(size, list) else [size]
    logits = view_logits(system, case, sizes=sizes, device=device, amp_dtype=amp_dtype, seed=seed, views=views)
    preds = [remove_small_components((mean_over_views(lg) > 0).cpu().numpy(), min_component) for lg in logits]
    return preds if isinstance(size, list) else preds[0]


def evaluate_cases(system, cases, *, sizes: list[tuple[int, int] | None], device: torch.device, amp_dtype=None,
                   seed: int = 0, progress: bool = True, min_component: int = 0,
                   views: tuple[FlipView, ...] = (FlipView(),), nsd_tolerance: float = 2.0,
                   empty_policy="nan") -> list[dict]:
    """Score every case at every requested grid (``None`` = native). One row per (case, grid).

    ``views``: flip test-time augmentation (:func:`imedsam.infer.tta.parse_tta`); default none.
    ``nsd_tolerance``, ``empty_policy``: as in :func:`imedsam.evaluate.metrics.binary_metrics`.
    """
    from imedsam.evaluate.metrics import binary_metrics

    rows = []
    system.eval()
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, leave=False):
        if not case.gt.any():
            log.warning("%s: empty ground truth, no box prompt possible; skipped", case.case_id)
            continue
        grids = [tuple(size) if size is not None else case.native_grid for size in sizes]
        preds = predict_case(system, case, size=grids, device=device, amp_dtype=amp_dtype, seed=seed,
                             min_component=min_component, views=views)
        n_components = count_components(case.gt, GT_COMPONENT_FRACTION)
        for grid, pred in zip(grids, preds):
            gt = case.gt_on(grid)
            spacing = None
            if case.spacing is not None:
                spacing = (case.spacing[0] * case.gt.shape[0] / grid[0], case.spacing[1] * case.gt.shape[1] / grid[1])
            metrics = binary_metrics(pred, gt, spacing=spacing, nsd_tolerance=nsd_tolerance,
                                     empty_policy=empty_policy)
            rows.append({"case": case.case_id, "grid": f"{grid[0]}x{grid[1]}", "height": grid[0], "width": grid[1],
                         **{k: (float(v) if v is not None else None) for k, v in metrics.items()},
                         "gt_components": n_components,
                         "box": " ".join(f"{v:g}" for v in case.prompt_box())})
    return rows
