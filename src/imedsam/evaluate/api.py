"""`imedsam evaluate` as a library call: predict a split from GT boxes, score, and write the report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)


def run_evaluation(*, run: str | None, model: str | None, checkpoint: str | None, data: str | Path, split: str,
                   sizes: list, sweep: bool, out: str | Path, device: str = "auto", precision: str = "fp32",
                   seed: int = 0, limit: int | None = None, adaptive: bool = False,
                   min_component: int = 0) -> dict:
    """Score a trained run (``run``) or a zero-shot model (``model``) on ``split`` of ``data``; returns a summary."""
    from imedsam.data import SegmentationDataset, discover
    from imedsam.evaluate.metrics import conventions, summarize
    from imedsam.evaluate.protocol import __doc__ as protocol_text
    from imedsam.evaluate.protocol import evaluate_cases, predict_case, resize_nearest
    from imedsam.evaluate.report import select_cases, write_report
    from imedsam.io.images import resize_rgb
    from imedsam.models.registry import build_system
    from imedsam.runtime import autocast_dtype, prepare_for_inference, resolve_device
    from imedsam.train.api import dataset_cases

    index = discover(data)
    if split not in index.counts():
        raise ImedsamError(f"--split: {data} has no {split!r} split (it has {sorted(index.counts())})")
    cases = dataset_cases(SegmentationDataset(index, split=split), limit=limit)
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    system = build_system("imedsam", adapter=run) if run else build_system(model, checkpoint=checkpoint)
    if adaptive:
        from imedsam.models.imedsam import set_adaptive_decoding

        set_adaptive_decoding(system)
    prepare_for_inference(system, dev, amp)  # built here for inference only
    rows = evaluate_cases(system, cases, sizes=sizes, device=dev, amp_dtype=amp, seed=seed,
                          min_component=min_component)
    if not rows:
        raise ImedsamError(f"--data: no case with a non-empty mask in split {split!r}")
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
        grid = tuple(case.gt.shape) if sizes[0] is None else tuple(sizes[0])
        pred = predict_case(system, case, size=grid, device=dev, amp_dtype=amp, seed=seed,
                            min_component=min_component)
        overlays[f"{label}: {case_id}"] = (resize_rgb(case.image, grid), resize_nearest(case.gt, grid), pred)
    config = {"run": str(run) if run else None, "model": model, "checkpoint": checkpoint, "data": str(data),
              "split": split, "grids": [s if s is None else list(s) for s in sizes], "precision": precision,
              "decoding": "adaptive" if adaptive else "exact", "min_component": min_component,
              "seed": seed, "prompt": "tight box of the ground-truth mask at the original resolution",
              "protocol": " ".join(protocol_text.split())}
    paths = write_report(out, rows, config=config, conventions=conventions(), overlays=overlays,
                         sweep=sweep_means, title=f"imedsam evaluation: {run or model} on {Path(data).name}/{split}",
                         group_by="gt_components")
    summary = summarize(main_rows)
    return {"report": str(Path(paths["html"]).resolve()), "cases": len(main_rows),
            "dice": summary["dice"]["mean"], "hd95": summary["hd95"]["mean"], "sweep": sweep_means}
