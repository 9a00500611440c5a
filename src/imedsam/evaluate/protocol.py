"""Evaluation: predict every case of a split under a prompt protocol and score it.

Protocol (written into every report): the prompt is, with ``--prompt box`` (default), the tight box of the
ground-truth mask at the dataset image's resolution (``--box-jitter LO,HI`` expands each side by a seeded U[LO, HI)
pixels); with ``points:N``, N random points drawn from the ground truth; with ``clicks:N``, N corrective clicks
each at the interior of the largest error region, the previous logits as mask prompt
(:mod:`imedsam.data.interaction` states each exactly); prompts are mapped once into the encoder frame; the
prediction is made DIRECTLY on the requested grid (the implicit decoder evaluates that grid; discrete
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

import torch
from tqdm import tqdm

from imedsam.data.cases import EvalCase, resize_nearest  # noqa: F401  (re-exported: the protocol's cases)
from imedsam.data.interaction import NOC_THRESHOLDS, Protocol, noc, run_case
from imedsam.models.postprocess import count_components, remove_small_components
from imedsam.models.views import FlipView, encode_views
from imedsam.runtime import autocast

log = logging.getLogger(__name__)

GT_COMPONENT_FRACTION = 0.05  # ground-truth components under 5 % of the object are not counted (specks)


@torch.inference_mode()
def view_logits(system, case: EvalCase, *, sizes: list[tuple[int, int]], device: torch.device, amp_dtype=None,
                seed: int = 0, views: tuple[FlipView, ...] = (FlipView(),)) -> list[list[torch.Tensor]]:
    """Per grid of ``sizes``, the (H_o, W_o) float logits of every view (:mod:`imedsam.models.views`), each restored
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
                 amp_dtype=None, seed: int = 0, min_component: int = 0, views: tuple[FlipView, ...] = (FlipView(),),
                 protocol: Protocol = Protocol("box"), index: int = 0, prompt: dict | None = None):
    """Predict one case with a prompt protocol on one grid or several; returns (H_o, W_o) bool (or a list).

    With several views (flip test-time augmentation) the views' logits are averaged before thresholding at 0.
    """
    sizes = size if isinstance(size, list) else [size]
    res = run_case(system, case, protocol, sizes=sizes, device=device, amp_dtype=amp_dtype, seed=seed, index=index,
                   views=views, prompt=prompt)
    preds = [remove_small_components(p, min_component) for p in res.preds]
    return preds if isinstance(size, list) else preds[0]


def evaluate_cases(system, cases, *, sizes: list[tuple[int, int] | None], device: torch.device, amp_dtype=None,
                   seed: int = 0, progress: bool = True, min_component: int = 0,
                   views: tuple[FlipView, ...] = (FlipView(),), nsd_tolerance: float = 2.0,
                   empty_policy="nan", protocol: Protocol = Protocol("box"),
                   prompts: dict[str, dict] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Score every case at every requested grid (``None`` = native) under a prompt ``protocol``
    (:mod:`imedsam.data.interaction`). One row per (case, grid); ``clicks:N`` rows also hold the Dice after each
    click (``dice_click_1`` ...) and ``noc85``/``noc90``, at the native grid only.

    ``views``: flip test-time augmentation (:func:`imedsam.models.views.parse_tta`); default none.
    ``nsd_tolerance``, ``empty_policy``: as in :func:`imedsam.evaluate.metrics.binary_metrics`.
    ``prompts``: the points of a ``points:N`` protocol per case id (reused instead of drawn).
    Returns the rows and the prompts used per case id.
    """
    out = evaluate_protocols(system, cases, [protocol], sizes=sizes, device=device, amp_dtype=amp_dtype, seed=seed,
                             progress=progress, min_component=min_component, views=views,
                             nsd_tolerance=nsd_tolerance, empty_policy=empty_policy,
                             prompts={protocol.name: prompts} if prompts else None)
    return out[protocol.name]


def evaluate_protocols(system, cases, protocols: list[Protocol], *, sizes: list[tuple[int, int] | None],
                       device: torch.device, amp_dtype=None, seed: int = 0, progress: bool = True,
                       min_component: int = 0, views: tuple[FlipView, ...] = (FlipView(),),
                       nsd_tolerance: float = 2.0, empty_policy="nan",
                       prompts: dict[str, dict[str, dict]] | None = None) -> dict[str, tuple[list[dict], dict]]:
    """:func:`evaluate_cases` for several protocols at once: every image is embedded once (per view) and every
    protocol decodes from that embedding. Returns ``{protocol name: (rows, prompts used)}``; ``prompts`` maps a
    protocol name to the prompts to reuse for it."""
    from imedsam.data.interaction import encode_case
    from imedsam.evaluate.metrics import binary_metrics

    results: dict[str, tuple[list[dict], dict]] = {p.name: ([], {}) for p in protocols}
    system.eval()
    for index, case in enumerate(tqdm(cases, desc="evaluate", unit="case", disable=not progress, leave=False)):
        if not case.gt.any():
            log.warning("%s: empty ground truth, no prompt possible; skipped", case.case_id)
            continue
        encoded = encode_case(system, case, views, device=device, amp_dtype=amp_dtype)
        n_components = count_components(case.gt, GT_COMPONENT_FRACTION)
        for protocol in protocols:
            rows, used = results[protocol.name]
            grids = [tuple(size) if size is not None else case.native_grid for size in sizes]
            if protocol.kind == "clicks":
                grids = [case.native_grid]
            reuse = (prompts or {}).get(protocol.name) or {}
            res = run_case(system, case, protocol, sizes=grids, device=device, amp_dtype=amp_dtype, seed=seed,
                           index=index, views=views, prompt=reuse.get(case.case_id), encoded=encoded)
            used[case.case_id] = res.prompt
            for grid, pred in zip(grids, res.preds):
                pred = remove_small_components(pred, min_component)
                gt = case.gt_on(grid)
                spacing = None
                if case.spacing is not None:
                    spacing = (case.spacing[0] * case.gt.shape[0] / grid[0],
                               case.spacing[1] * case.gt.shape[1] / grid[1])
                metrics = binary_metrics(pred, gt, spacing=spacing, nsd_tolerance=nsd_tolerance,
                                         empty_policy=empty_policy)
                row = {"case": case.case_id, "image": case.image_id, "grid": f"{grid[0]}x{grid[1]}",
                       "height": grid[0], "width": grid[1],
                       **{k: (float(v) if v is not None else None) for k, v in metrics.items()},
                       "gt_components": n_components, **_describe(res.prompt)}
                if res.dice_per_click is not None:
                    row.update({f"dice_click_{i}": d for i, d in enumerate(res.dice_per_click, start=1)})
                    row.update({f"noc{round(t * 100)}": noc(res.dice_per_click, t) for t in NOC_THRESHOLDS})
                rows.append(row)
    return results


def _describe(prompt: dict) -> dict[str, str]:
    """The prompt as a cases.csv column: ``box`` "x0 y0 x1 y1", or ``points`` "x,y:label ..."."""
    if "box" in prompt:
        return {"box": " ".join(f"{v:g}" for v in prompt["box"])}
    pts = zip(prompt.get("points", []), prompt.get("labels", []))
    return {"points": " ".join(f"{x:g},{y:g}:{lab}" for (x, y), lab in pts)}
