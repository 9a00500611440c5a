"""`imedsam evaluate` as a library call: predict a split under a prompt protocol, score, and write the report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)


def run_evaluation(*, run: str | None, model: str | None, checkpoint: str | None, data: str | Path, split: str,
                   sizes: list, sweep: bool, out: str | Path, device: str = "auto", precision: str = "fp32",
                   seed: int = 0, limit: int | None = None, adaptive: bool = False,
                   min_component: int = 0, tta: str | None = None, box_jitter: tuple[float, float] | None = None,
                   gt_dir: str | Path | None = None, nsd_tolerance: float = 2.0, empty_policy="nan",
                   prompt: str = "box", prompts_file: str | Path | None = None, min_foreground: int = 1,
                   objects: str = "classes", preprocess: str | None = None) -> dict:
    """Score a trained run (``run``) or a zero-shot model (``model``) on ``split`` of ``data``; returns a summary.

    ``split``: a split name, or ``"all"`` (every case; also what a folder without splits gets). ``prompt``: the
    protocol, ``box``, ``points:N`` or ``clicks:N`` (:mod:`imedsam.data.interaction`); the points drawn by
    ``points:N`` are written to ``prompts.json`` in ``out``, and ``prompts_file`` reuses such a file.
    ``box_jitter``: (lo, hi) pixels, each side of the GT box expanded by U[lo, hi) (seeded by ``seed``); ``gt_dir``:
    a folder of masks named like the dataset's images to score against instead (see :func:`load_gt_dir`);
    ``nsd_tolerance`` and ``empty_policy``: as in :func:`imedsam.evaluate.metrics.binary_metrics`.
    ``min_foreground``: score only objects (and slices of volumes) with at least this many pixels. ``objects``:
    ``"classes"`` (one prompt target per class of an image) or ``"components"`` (one per connected component,
    :func:`imedsam.data.cases.split_components`; not with ``gt_dir``).
    """
    from imedsam.data import SegmentationDataset, discover
    from imedsam.data.cases import dataset_cases
    from imedsam.data.interaction import load_prompts, parse_protocol, save_prompts
    from imedsam.evaluate.metrics import conventions, summarize
    from imedsam.evaluate.protocol import __doc__ as protocol_text
    from imedsam.evaluate.protocol import evaluate_cases, predict_case
    from imedsam.evaluate.report import select_cases, write_report
    from imedsam.io.images import resize_rgb
    from imedsam.models.registry import build_system
    from imedsam.models.views import parse_tta
    from imedsam.runtime import autocast_dtype, prepare_for_inference, resolve_device

    views = parse_tta(tta)
    protocol = parse_protocol(prompt)
    if protocol.kind == "clicks" and len(views) > 1:
        raise ImedsamError("--tta: the clicks protocol feeds back the previous mask and runs on the image itself; "
                           "drop --tta or use --prompt box / points:N")
    if limit is not None and limit < 1:
        raise ImedsamError(f"--limit: must be >= 1 (the number of cases to score), got {limit}")
    index = discover(data)
    split_arg = resolve_split(index, split, data)
    jitter = {"mode": "expand", "expand": tuple(box_jitter)} if box_jitter else None
    if min_foreground < 1:
        raise ImedsamError(f"--min-foreground: must be >= 1 pixel, got {min_foreground}")
    if objects not in ("classes", "components"):
        raise ImedsamError(f"--objects: {objects!r}; use classes or components")
    if objects == "components" and gt_dir is not None:
        raise ImedsamError("--objects components: not with --gt-dir (the other grid's masks are whole classes)")
    cases = dataset_cases(SegmentationDataset(index, split=split_arg, box_jitter=jitter, seed=seed,
                                              min_foreground=min_foreground), limit=limit)
    if objects == "components":
        from imedsam.data.cases import split_components

        cases = split_components(cases, min_foreground)
    reused = None
    if prompts_file is not None:
        if protocol.kind != "points":
            raise ImedsamError(f"--prompts: only the points:N protocol draws prompts to reuse, not {protocol.name}")
        reused = load_prompts(prompts_file, protocol, [c.case_id for c in cases])
    if gt_dir is not None:
        load_gt_dir(cases, gt_dir)
    spacing = next((c.spacing for c in cases if c.spacing is not None), None)  # distances in mm where known
    metric_conventions = conventions(  # also checks both options before the model is built
        spacing=spacing, nsd_tolerance=nsd_tolerance, empty_policy=empty_policy)
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    system = (build_system(adapter=run, preprocess=preprocess) if run
              else build_system(model, checkpoint=checkpoint, preprocess=preprocess))
    system.check_prompts(protocol.prompt_types)
    if adaptive:
        from imedsam.models.imedsam import set_adaptive_decoding

        set_adaptive_decoding(system)
    prepare_for_inference(system, dev, amp)  # built here for inference only
    rows, used = evaluate_cases(system, cases, sizes=sizes, device=dev, amp_dtype=amp, seed=seed,
                                min_component=min_component, views=views, nsd_tolerance=nsd_tolerance,
                                empty_policy=empty_policy, protocol=protocol, prompts=reused)
    if not rows:
        raise ImedsamError(f"--data: no case with a non-empty mask in split {split!r}")
    if protocol.kind == "points":
        save_prompts(Path(out) / "prompts.json", used, protocol, seed)
    sweep_means = None
    if sweep:
        sweep_means = {}
        for size in sizes:
            d = [r["dice"] for r in rows if (r["height"], r["width"]) == tuple(size)]
            sweep_means[int(size[0])] = float(np.mean(d))
    main_grid = rows[0]["grid"]
    main_rows = [r for r in rows if r["grid"] == main_grid] if sweep else rows
    picks = select_cases(main_rows)
    by_id = {c.case_id: c for c in cases}
    overlays = {}
    for label, case_id in picks.items():
        case = by_id[case_id]
        grid = case.native_grid if sizes[0] is None else tuple(sizes[0])
        pred = predict_case(system, case, size=grid, device=dev, amp_dtype=amp, seed=seed,
                            min_component=min_component, views=views, protocol=protocol,
                            index=cases.index(case), prompt=used.get(case.case_id))
        overlays[case_id] = (resize_rgb(case.image, grid), case.gt_on(grid), pred)
    config = {"run": str(run) if run else None, "model": model, "checkpoint": checkpoint, "data": str(data),
              "split": split, "grids": [s if s is None else list(s) for s in sizes], "precision": precision,
              "decoding": "adaptive" if adaptive else "exact", "min_component": min_component,
              "tta": ",".join(v.name for v in views), "min_foreground": min_foreground, "objects": objects,
              "seed": seed, "gt_dir": None if gt_dir is None else str(gt_dir),
              "preprocess": system.preprocess.pipeline,
              "prompt": _prompt_text(protocol, box_jitter, seed, prompts_file),
              "protocol": " ".join(protocol_text.split())}
    headline = {"protocol": protocol.name, "dice (mean per mask)": summarize(main_rows)["dice"]["mean"],
                "dice (mean per image)": per_image_mean(main_rows, "dice")}
    if protocol.kind == "clicks":
        headline.update(click_summary(main_rows, protocol.n))
    paths = write_report(out, rows, config=config, conventions=metric_conventions, overlays=overlays,
                         sweep=sweep_means, title=f"imedsam evaluation: {run or model} on {Path(data).name}/{split}",
                         group_by="gt_components", headline=headline, selected=picks)
    summary = summarize(main_rows)
    result = {"report": str(Path(paths["html"]).resolve()), "protocol": protocol.name, "cases": len(main_rows),
              "dice": summary["dice"]["mean"], "dice_per_image": per_image_mean(main_rows, "dice"),
              "hd95": summary["hd95"]["mean"], "sweep": sweep_means}
    if protocol.kind == "clicks":
        result.update(click_summary(main_rows, protocol.n))
    return result


def resolve_split(index, split: str, data) -> str | None:
    """``--split`` against a dataset index: a split it has, or ``all`` (None: every case; what a folder without
    splits gets, also for the default ``test``)."""
    if split == "all" or not index.has_splits:
        if split not in ("all", "test"):
            raise ImedsamError(f"--split: {data} has no splits; use --split all (or leave it out) to score every "
                               "case")
        return None
    if split not in index.counts():
        names = sorted(k for k in index.counts() if k is not None)
        raise ImedsamError(f"--split: {data} has no {split!r} split; it has {', '.join(names)} (or use all)")
    return split


def per_image_mean(rows: list[dict], key: str) -> float:
    """Mean over images of the per-image mean of ``key`` (rows of several objects of one image count once)."""
    by_image: dict[str, list[float]] = {}
    for r in rows:
        by_image.setdefault(r.get("image", r["case"]), []).append(float(r[key]))
    return float(np.mean([np.mean(v) for v in by_image.values()]))


def click_summary(rows: list[dict], n: int) -> dict:
    """Mean Dice after each click (per mask) and mean NoC@85 / NoC@90 of a clicks protocol's rows."""
    out = {"dice_per_click": [round(float(np.mean([r[f"dice_click_{i}"] for r in rows])), 4)
                              for i in range(1, n + 1)]}
    for key in ("noc85", "noc90"):
        out[key] = round(float(np.mean([r[key] for r in rows])), 3)
    return out


def _prompt_text(protocol, box_jitter, seed: int, prompts_file) -> str:
    if protocol.kind == "box":
        return ("tight box of the ground-truth mask at the dataset image's resolution"
                + (f", each side expanded by U[{box_jitter[0]:g}, {box_jitter[1]:g}) px (seed {seed})"
                   if box_jitter else ""))
    if protocol.kind == "points":
        source = f"read from {prompts_file}" if prompts_file else f"drawn with seed {seed}, saved in prompts.json"
        n_fg = 1 if protocol.n == 1 else protocol.n // 2
        return (f"{protocol.n} random point(s) from the ground truth ({n_fg} foreground + {protocol.n - n_fg} "
                f"background, uniformly without replacement), {source}")
    return (f"{protocol.n} corrective clicks, each at the interior-most pixel of the largest error region (label "
            "1 on a false negative, 0 on a false positive), accumulated, previous logits as mask prompt when the "
            "model takes one; Dice after each click, NoC@85/90 capped at the click count")


def load_gt_dir(cases: list, gt_dir: str | Path) -> None:
    """Attach to every 2D case the mask of the same file stem in ``gt_dir`` as its ``gt_native``.

    The masks may be on any grid of the same field of view (e.g. the original resolution of a down-sampled
    dataset); binary (0/1, 0/255) or label maps (the case's class is taken). Raises a one-line error naming the
    folder or file when a mask is missing, unreadable, or its aspect ratio differs from the image's by over 2 %.
    """
    from imedsam.data.folders import file_stem
    from imedsam.data.samples import normalize_mask
    from imedsam.io import read

    folder = Path(gt_dir)
    if not folder.is_dir():
        raise ImedsamError(f"--gt-dir: folder not found: {gt_dir}")
    by_stem = {file_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    for case in cases:
        if case.slice_index is not None:
            raise ImedsamError(f"--gt-dir: case {case.case_id} is a slice of a volume; --gt-dir takes 2D datasets")
        path = by_stem.get(case.stem)
        if path is None:
            raise ImedsamError(f"--gt-dir: no mask named {case.stem}.* in {gt_dir}; it needs one per image")
        labels = normalize_mask(read(path).array, source=path, ndim=2)
        (h, w), (hn, wn) = case.gt.shape, labels.shape
        if abs((hn / wn) / (h / w) - 1) > 0.02:
            raise ImedsamError(f"--gt-dir: {path} is {hn}x{wn} (HxW) but the image is {h}x{w}: a ground truth "
                               f"must cover the image's field of view with the same aspect ratio")
        case.gt_native = labels == case.class_id
