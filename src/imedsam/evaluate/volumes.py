"""Per-volume evaluation of a promptable 2D system on 3D datasets (``imedsam evaluate --volumes``).

Protocol (written into every report): each volume of the split is read with its geometry; one intensity mapping
serves the whole volume (:func:`imedsam.io.images.to_display_volume`, as in training); for every class present in
its label volume, the object is segmented slice by slice across ``axis`` (:mod:`imedsam.data.volume_prompts`) and
scored in 3-D against the ground truth, with the volume's real spacing (distances in mm; spacing in array order
``(dz, dy, dx)``). Prompts, from the ground truth:

* ``box`` (default): every slice whose ground truth has at least ``min_foreground`` pixels gets that slice's
  tight box (the 2-D slice-by-slice protocol of MedSAM and SAM-Med2D's 3-D evaluation); the other slices are
  background;
* ``box3d``: the tight 3-D box of the object; every slice of its range is prompted with its 2-D extent;
* ``propagate``: the tight box of the object on its middle slice (the middle of its extent across the axis),
  then each next slice prompted with the previous slice's predicted mask's box until the mask vanishes
  (MedSAM's 3-D protocol);
* ``auto``: no prompt, for prompt-free multi-class systems (MA-SAM): every class of the volume at once from
  sliding stacks of adjacent slices (``predict_volume``), argmax.

Multi-class volume systems (MA-SAM, which see stacks of slices) take ``auto`` (prompt-free) or, box-prompted,
``box3d``: one box per scan, the tight 3-D box of all its labelled voxels (every class), given to every slice of
its range, every class at once (``predict_volume(box3d=...)``); the slices outside its range are background.
Their stacks are centred on every slice (``stack_stride`` 1, MA-SAM's protocol) or on every N-th slice
(``stack_stride`` N, recorded in the report: each slice averages about D/N stacks, N times less work), across
the model's ``stack_axes`` or ``stack_axes`` given (k; k, j, i: tri-planar, the axes' probabilities averaged).

``largest_component`` (off by default; recorded in the report): each class's prediction is reduced to its largest
3-D connected component (26-connected) before scoring, the usual post-processing of single-structure volume
benchmarks.

One row per (volume, class): Dice, IoU, HD95, HD (mm) and NSD (tolerance in mm), the slices prompted, the
ground truth's slices. Means are over rows (volume x class) and per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from imedsam.data.cases import EvalCase
from imedsam.data.interaction import Protocol, encode_case, run_case
from imedsam.data.prompts import box_from_mask
from imedsam.data.volume_prompts import SliceFrame, VolumePrompt, segment_volume, volume_box
from imedsam.errors import ImedsamError
from imedsam.evaluate.metrics import binary_metrics
from imedsam.models.postprocess import largest_component as keep_largest
from imedsam.models.views import FlipView

log = logging.getLogger(__name__)

VOLUME_PROTOCOLS: tuple[str, ...] = ("box", "box3d", "propagate", "auto")


def check_volume_protocol(name: str) -> str:
    if name not in VOLUME_PROTOCOLS:
        raise ImedsamError(f"--prompt {name!r}: with --volumes use one of {', '.join(VOLUME_PROTOCOLS)} (per-slice "
                           "ground-truth boxes, one 3-D box, one slice's box propagated, or none: a prompt-free "
                           "model)")
    return name


def volume_prompt(protocol: str, gt: np.ndarray, frame: SliceFrame) -> VolumePrompt | None:
    """The :class:`VolumePrompt` of ``box3d`` / ``propagate`` for a (D, H, W) ground truth (None when empty).
    Coordinates are the file's (i, j, k) voxel indices, half-open."""
    if not gt.any():
        return None
    if protocol == "box3d":
        idx = np.nonzero(gt)  # (k, j, i) arrays
        lo = [int(idx[2].min()), int(idx[1].min()), int(idx[0].min())]
        hi = [int(idx[2].max()) + 1, int(idx[1].max()) + 1, int(idx[0].max()) + 1]
        return VolumePrompt(box3d=tuple(float(v) for v in lo + hi))
    if protocol == "propagate":
        present = np.nonzero(gt.any(axis=tuple(a for a in range(3) if a != frame.array_axis)))[0]
        mid = int(present[(len(present) - 1) // 2])
        x0, y0, x1, y1 = (float(v) for v in box_from_mask(frame.take(gt, mid)))
        lo, hi = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        xi, yi = frame.xy
        lo[xi], lo[yi], lo[frame.s] = x0, y0, float(mid)
        hi[xi], hi[yi], hi[frame.s] = x1, y1, float(mid + 1)
        return VolumePrompt(box3d=tuple(lo + hi), propagate=True)
    raise ImedsamError(f"volume_prompt: protocol {protocol!r} has no single 3-D prompt")


@dataclass
class VolumeResult:
    """One object of one volume: its row and what a report overlay needs (the slice with most ground truth)."""

    row: dict
    image: np.ndarray  # (H, W) uint8 slice
    gt: np.ndarray  # (H, W) bool
    pred: np.ndarray  # (H, W) bool


def predict_slice(system, case: EvalCase, *, device: torch.device, amp_dtype=None, seed: int = 0,
                  views: tuple[FlipView, ...] = (FlipView(),), encoded: list | None = None) -> np.ndarray:
    """(H, W) bool prediction of one slice from ``case.box``; ``encoded`` (:func:`encode_case`) reuses the
    slice's embedding (several objects on one slice cost one encoder pass)."""
    res = run_case(system, case, Protocol("box"), sizes=[None], device=device, amp_dtype=amp_dtype, seed=seed,
                   views=views, encoded=encoded)
    return res.preds[0]


def _slice_case(case_id: str, image: np.ndarray, gt: np.ndarray, box, s: int, frame: SliceFrame) -> EvalCase:
    plane = frame.take(image, s)
    return EvalCase(case_id=f"{case_id}#z{s}", image=np.repeat(plane[..., None], 3, axis=2),
                    gt=frame.take(gt, s), box=None if box is None else np.asarray(box, dtype=np.float64),
                    slice_index=s)


def evaluate_volume(system, case_id: str, image: np.ndarray, labels: np.ndarray,
                    spacing: tuple[float, ...] | None, protocol: str, *, frame: SliceFrame, device: torch.device,
                    amp_dtype=None, views: tuple[FlipView, ...] = (FlipView(),), min_foreground: int = 1,
                    nsd_tolerance: float = 1.0, empty_policy="nan", seed: int = 0,
                    classes: list[int] | None = None, largest_component: bool = False,
                    stack_stride: int = 1, stack_axes: tuple[str, ...] | None = None) -> list[VolumeResult]:
    """Segment and score every class of one volume (``image`` uint8 (D, H, W), ``labels`` int (D, H, W)).
    ``stack_stride``, ``stack_axes``: a stack model's stacks centred on every N-th slice, across these file axes
    (``predict_volume(stride=..., axes=...)``; None: the model's own).

    ``box``: slice by slice, each slice encoded once for all the objects on it; ``box3d`` / ``propagate``: object
    by object (propagation is sequential), each prompted slice encoded for its object."""
    present = [int(c) for c in np.unique(labels) if c > 0]
    targets = present if classes is None else [c for c in classes if c in present]
    gts = {c: labels == c for c in targets}
    preds = {c: np.zeros(labels.shape, bool) for c in targets}
    prompted = dict.fromkeys(targets, 0)
    options = dict(device=device, amp_dtype=amp_dtype, seed=seed, views=views)
    if protocol == "auto":
        if frame.array_axis != 0:
            raise ImedsamError("--axis: a prompt-free volume model runs across the axis it was trained on (k)")
        predicted = system.predict_volume(image, device=device, amp_dtype=amp_dtype, views=views,
                                          stride=stack_stride, axes=stack_axes).argmax(0).numpy()
        for c in targets:
            preds[c] = predicted == c
    elif protocol == "box3d" and hasattr(system, "predict_volume"):  # box-prompted volume system: 1 box per scan
        if frame.array_axis != 0:
            raise ImedsamError("--axis: a volume model runs across the axis it was trained on (k)")
        box3d = volume_box(np.isin(labels, targets)) if targets else None
        predicted = (np.zeros(labels.shape, np.int64) if box3d is None else  # no object: nothing to prompt
                     system.predict_volume(image, device=device, amp_dtype=amp_dtype, box3d=box3d,
                                           views=views, stride=stack_stride,
                                           axes=stack_axes).argmax(0).numpy())
        for c in targets:
            preds[c] = predicted == c
            prompted[c] = 0 if box3d is None else int(box3d[5] - box3d[2])
    elif protocol == "box":
        for s in range(labels.shape[frame.array_axis]):
            on_slice = [c for c in targets if int(frame.take(gts[c], s).sum()) >= min_foreground]
            encoded = None
            for c in on_slice:
                case = _slice_case(case_id, image, gts[c], box_from_mask(frame.take(gts[c], s)), s, frame)
                if encoded is None:
                    encoded = encode_case(system, case, views, device=device, amp_dtype=amp_dtype)
                frame.put(preds[c], s, predict_slice(system, case, encoded=encoded, **options))
                prompted[c] += 1
    else:
        for c in targets:
            def predict(s: int, box, points, point_labels, _c=c) -> np.ndarray:
                if box is None:
                    return np.zeros(frame.take(image, s).shape, bool)
                return predict_slice(system, _slice_case(case_id, image, gts[_c], box, s, frame), **options)

            def count(_s: int, _m: np.ndarray, _c=c) -> None:
                prompted[_c] += 1

            preds[c] = segment_volume(predict, labels.shape, volume_prompt(protocol, gts[c], frame), frame,
                                      on_slice=count)
    others = tuple(a for a in range(3) if a != frame.array_axis)
    results = []
    for c in targets:
        gt, pred = gts[c], (keep_largest(preds[c]) if largest_component else preds[c])
        row = {"case": f"{case_id}#c{c}", "volume": case_id, "class": c,
               **binary_metrics(pred, gt, spacing=spacing, nsd_tolerance=nsd_tolerance, empty_policy=empty_policy),
               "slices_prompted": prompted[c], "gt_slices": int(gt.any(axis=others).sum()),
               "gt_voxels": int(gt.sum()), "pred_voxels": int(pred.sum())}
        best = int(np.argmax(gt.sum(axis=others)))
        results.append(VolumeResult(row=row, image=frame.take(image, best), gt=frame.take(gt, best),
                                    pred=frame.take(pred, best)))
    return results


def evaluate_volumes(system, cases, protocol: str, *, axis: str = "k", window=None, device: torch.device,
                     amp_dtype=None, views: tuple[FlipView, ...] = (FlipView(),), min_foreground: int = 1,
                     nsd_tolerance: float = 1.0, empty_policy="nan", seed: int = 0,
                     progress: bool = True, largest_component: bool = False,
                     stack_stride: int = 1, stack_axes: tuple[str, ...] | None = None) -> list[VolumeResult]:
    """Every (volume, class) of ``cases`` (:class:`imedsam.data.folders.CaseRef` of 3-D images)."""
    from imedsam.data.dataset import read_case

    check_volume_protocol(protocol)
    frame = SliceFrame(axis)
    out: list[VolumeResult] = []
    for case in tqdm(cases, desc="evaluate volumes", unit="volume", disable=not progress, leave=False):
        image, labels, spacing = read_case(case, window=window, with_spacing=True)
        if image.ndim != 3:
            raise ImedsamError(f"--volumes: {case.image_path} is a 2D image; --volumes scores 3-D volumes (drop it "
                               "for 2-D data)")
        out.extend(evaluate_volume(system, case.case_id, image, labels, spacing, protocol, frame=frame,
                                   device=device, amp_dtype=amp_dtype, views=views, min_foreground=min_foreground,
                                   nsd_tolerance=nsd_tolerance, empty_policy=empty_policy, seed=seed,
                                   largest_component=largest_component, stack_stride=stack_stride,
                                   stack_axes=stack_axes))
    return out


def run_volume_evaluation(*, run: str | None, model: str | None, checkpoint: str | None, data, split: str, out,
                          prompt: str = "box", axis: str = "k", window=None, device: str = "auto",
                          precision: str = "auto", seed: int = 0, limit: int | None = None, tta: str | None = None,
                          min_foreground: int = 1, nsd_tolerance: float = 1.0, empty_policy="nan",
                          preprocess: str | None = None, progress: bool = True,
                          largest_component: bool = False, stack_stride: int = 1,
                          stack_axes: tuple[str, ...] | None = None) -> dict:
    """``imedsam evaluate --volumes``: score a run or a zero-shot model per volume and class on ``split`` of a 3-D
    dataset (module docstring); writes cases.csv, summary.json and report.html in ``out``; returns a summary.
    Every argument is checked before the model is built."""
    from pathlib import Path

    from imedsam.data import discover
    from imedsam.evaluate.api import resolve_split
    from imedsam.evaluate.metrics import conventions, summarize
    from imedsam.evaluate.report import select_cases, write_report
    from imedsam.models.registry import build_system
    from imedsam.models.views import parse_tta
    from imedsam.runtime import autocast_dtype, prepare_for_inference, resolve_device

    check_volume_protocol(prompt)
    SliceFrame(axis)
    views = parse_tta(tta)
    if limit is not None and limit < 1:
        raise ImedsamError(f"--limit: must be >= 1 (the number of volumes to score), got {limit}")
    if min_foreground < 1:
        raise ImedsamError(f"--min-foreground: must be >= 1 pixel, got {min_foreground}")
    for flag, given in (("--stack-stride", stack_stride != 1), ("--stack-axes", stack_axes is not None)):
        if given and prompt not in ("auto", "box3d"):
            raise ImedsamError(f"{flag}: goes with --prompt auto or box3d (models that see stacks of slices), "
                               f"not --prompt {prompt}")
    index = discover(data)
    split_arg = resolve_split(index, split, data)
    cases = [c for c in index if split_arg is None or c.split == split_arg][:limit]
    if not cases:
        raise ImedsamError(f"--data: {data} has no case in split {split!r}")
    metric_conventions = conventions(spacing=(1.0, 1.0, 1.0), nsd_tolerance=nsd_tolerance,
                                     empty_policy=empty_policy)
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    system = (build_system(adapter=run, preprocess=preprocess) if run
              else build_system(model, checkpoint=checkpoint, preprocess=preprocess))
    if prompt == "auto":
        if not (getattr(system, "prompt_free", False) and hasattr(system, "predict_volume")):
            raise ImedsamError(f"--prompt auto: {run or model!r} needs a prompt; use --prompt box, box3d or "
                               "propagate (auto is for prompt-free volume models, e.g. a trained ma_sam run)")
    else:
        system.check_prompts(["box"])
        for flag, given in (("--stack-stride", stack_stride != 1), ("--stack-axes", stack_axes is not None)):
            if given and not hasattr(system, "predict_volume"):
                raise ImedsamError(f"{flag}: {run or model!r} segments slice by slice; it goes with a model that "
                                   "sees stacks of slices (a ma_sam run)")
        if hasattr(system, "predict_volume") and prompt != "box3d":
            raise ImedsamError(f"--prompt {prompt}: {run or model!r} sees stacks of slices and takes one 3-D box "
                               "per scan; use --prompt box3d")
    if hasattr(system, "check_stack_stride"):  # before any volume is read
        system.check_stack_stride(stack_stride)
        stack_axes = system.check_stack_axes(stack_axes)
    prepare_for_inference(system, dev, amp)
    results = evaluate_volumes(system, cases, prompt, axis=axis, window=window, device=dev, amp_dtype=amp,
                               views=views, min_foreground=min_foreground, nsd_tolerance=nsd_tolerance,
                               empty_policy=empty_policy, seed=seed, progress=progress,
                               largest_component=largest_component, stack_stride=stack_stride,
                               stack_axes=stack_axes)
    if not results:
        raise ImedsamError(f"--data: no volume of split {split!r} has a labelled object")
    rows = [r.row for r in results]
    picks = select_cases(rows)
    by_case = {r.row["case"]: r for r in results}
    overlays = {cid: (by_case[cid].image, by_case[cid].gt, by_case[cid].pred) for cid in picks.values()}
    per_class = {int(c): float(np.nanmean([r["dice"] for r in rows if r["class"] == c]))
                 for c in sorted({r["class"] for r in rows})}
    per_volume = {}
    for r in rows:
        per_volume.setdefault(r["volume"], []).append(r["dice"])
    headline = {"protocol": f"volumes, {prompt}", "dice (mean per volume and class)": summarize(rows)["dice"]["mean"],
                "dice (mean per volume)": float(np.mean([np.mean(v) for v in per_volume.values()])),
                "dice per class": per_class}
    config = {"run": str(run) if run else None, "model": model, "checkpoint": checkpoint, "data": str(data),
              "split": split, "volumes": len(cases), "axis": axis, "window": window, "precision": precision,
              "tta": ",".join(v.name for v in views), "min_foreground": min_foreground, "seed": seed,
              "largest_component": largest_component, "stack_stride": stack_stride,
              "stack_axes": ",".join(stack_axes) if stack_axes else None,
              "preprocess": system.preprocess.pipeline, "prompt": prompt,
              "protocol": " ".join(__doc__.split("Protocol (written into every report):")[1].split())}
    paths = write_report(out, rows, config=config, conventions=metric_conventions, overlays=overlays,
                         title=f"imedsam volume evaluation: {run or model} on {Path(data).name}/{split}",
                         group_by="class", headline=headline, selected=picks)
    summary = summarize(rows)
    return {"report": str(Path(paths["html"]).resolve()), "protocol": f"volumes:{prompt}", "volumes": len(cases),
            "rows": len(rows), "dice": summary["dice"]["mean"], "hd95_mm": summary["hd95"]["mean"],
            "nsd": summary["nsd"]["mean"], "dice_per_class": per_class}
