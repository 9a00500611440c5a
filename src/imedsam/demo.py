"""`imedsam demo` / `make demo`: the main job on the embedded default, in a few minutes on 2 CPU cores.

1. Zero-shot: the CT slice that pydicom ships (``CT_small.dcm``, 128x128, a thoracic vertebra; real CT, public
   test data of pydicom) is segmented with LiteMedSAM from a box around the vertebral body; the mask and an
   overlay PNG are written.
2. Fine-tune: a short I-MedSAM run (LoRA + frequency adapter + implicit decoder on LiteMedSAM's TinyViT) on the
   embedded data set, built on the spot: synthetic ellipse lesions on real CT texture
   (:mod:`imedsam.data.synthetic`; **the lesions are synthetic, not real patient data**), or on the user's
   folder with ``make demo DATA=path`` / ``imedsam demo --data path`` (images/ + masks/ + splits.json, or nnU-Net).
3. Evaluate: the trained run on the ``test`` split from tight ground-truth boxes, decoded directly at several
   output grids (64, 128, 256), with ``report.html`` (overlays, Dice distribution, Dice vs output size).

A rerun continues (or reuses) the run already in the output folder instead of overwriting it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)

#: box around the vertebral body of CT_small.dcm, (x0, y0, x1, y1) in pixels of the 128x128 slice
CT_SMALL_VERTEBRA_BOX = (40.0, 3.0, 81.0, 47.0)


def run_zero_shot_ct(out: Path, device: str = "auto") -> dict:
    """Segment the embedded CT slice with LiteMedSAM; returns the written paths and mask statistics."""
    from imedsam import io
    from imedsam.infer.segmenter import Segmenter
    from imedsam.io.samples import embedded_ct_slice

    sample = io.read(embedded_ct_slice())
    rgb = io.to_display_rgb(sample, window="soft_tissue")
    seg = Segmenter("litemedsam", device=device)
    seg.set_image(rgb)
    pred = seg.predict(box=CT_SMALL_VERTEBRA_BOX)
    mask = pred.masks[0]
    mask_path, overlay_path = out / "ct_small_mask.png", out / "ct_small_overlay.png"
    io.write_mask(mask_path, mask)
    io.write_overlay(overlay_path, rgb, mask)
    spacing = sample.geometry.spacing
    area_mm2 = float(mask.sum() * spacing[0] * spacing[1]) if spacing else None
    return {"image": str(embedded_ct_slice()), "box": list(CT_SMALL_VERTEBRA_BOX),
            "mask": str(mask_path.resolve()), "overlay": str(overlay_path.resolve()),
            "foreground_pixels": int(mask.sum()), "area_mm2": area_mm2, "score": float(pred.scores[0])}


#: the short fine-tune of the demo (a few minutes on 2 cores); the user's data trains at 256 px
DEMO_OVERRIDES = ["model.backbone=litemedsam", "optim.epochs=4", "optim.batch_size=2",
                  "objective.points_per_image=2048", "objective.coarse_warm_epochs=2", "run.val_every=2", "run.seed=0"]
DEMO_SWEEP = [(64, 64), (128, 128), (256, 256)]


def run_finetune_demo(out: Path, data: Path | None = None, device: str = "auto",
                      overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Fine-tune I-MedSAM briefly on ``data`` (default: the synthetic lesions) and evaluate it; returns a summary.

    ``overrides`` (``KEY=VALUE``) apply after the demo's own settings (tests use a tiny backbone).
    """
    from imedsam.data.synthetic import make_synthetic_lesions
    from imedsam.evaluate.api import run_evaluation
    from imedsam.train import checkpoint as ckpt
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    synthetic = data is None
    if synthetic:
        data = out / "synthetic_lesions"
        if not (data / "splits.json").exists():
            make_synthetic_lesions(data, n=24, size=128, seed=0)
    size = 128 if synthetic else 256
    cfg = load_config(None, DEMO_OVERRIDES + [f"data.image_size={size}", f"run.device={device}", *overrides])
    run_dir = out / "imedsam_run"
    result = run_training(cfg, data, run_dir, resume=ckpt.has_run(run_dir))
    summary = run_evaluation(run=str(run_dir), model=None, checkpoint=None, data=data, split="test",
                             sizes=DEMO_SWEEP, sweep=True, out=out / "report", device=device)
    return {"data": str(Path(data).resolve()), "synthetic": synthetic, "run": str(run_dir.resolve()),
            "train_seconds": round(result.seconds, 1), "best_val_dice": result.best_score, **summary}


def run_demo(out: Path, data: Path | None = None, device: str = "auto") -> dict:
    """Run the demo; prints one JSON line per step and returns them."""
    out = Path(out)
    if data is not None and not Path(data).exists():
        raise ImedsamError(f"--data: folder not found: {data}")
    out.mkdir(parents=True, exist_ok=True)
    results = {"zero_shot_ct": run_zero_shot_ct(out, device)}
    print(json.dumps({"step": "zero_shot_ct", **results["zero_shot_ct"]}), flush=True)
    results["finetune"] = run_finetune_demo(out, None if data is None else Path(data), device)
    print(json.dumps({"step": "finetune_and_evaluate", **results["finetune"]}), flush=True)
    return results
