"""`imedsam demo` / `make demo`: the main job on the embedded default, in a few minutes on 2 CPU cores.

1. Zero-shot: the CT slice that pydicom ships (``CT_small.dcm``, 128x128, a thoracic vertebra; real CT, public
   test data of pydicom) is segmented with LiteMedSAM from a box around the vertebral body; the mask and an
   overlay PNG are written.
2. Fine-tune: a short SAM-Med2D run (adapters beside every MLP of LiteMedSAM's TinyViT, prompt encoder and mask
   decoder trained with simulated clicks) on the embedded data set, built on the spot: synthetic ellipse lesions
   on real CT texture (:mod:`imedsam.data.synthetic`; **the lesions are synthetic, not real patient data**), or
   on the user's folder with ``make demo DATA=path`` / ``imedsam demo --data path`` (images/ + masks/ +
   splits.json, or nnU-Net).
3. Compare: zero-shot LiteMedSAM and the fine-tuned model on the ``test`` split, side by side, from the tight
   ground-truth box and from one random foreground point (the same points for both), with a ``report.html``
   per model and prompt (overlays of the best, median and worst cases, Dice distribution).

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


#: the demo's fine-tune: SAM-Med2D on LiteMedSAM (light adapters beside every MLP, prompt encoder and mask decoder
#: trained with simulated clicks), about 150 optimizer passes: a couple of minutes on 2 cores
DEMO_OVERRIDES = [
    "model.system=sam_med2d", "model.backbone=litemedsam", "model.multimask_output=false",
    "model.peft.adapter_dim=16", "model.peft.se_reduction=16", "model.peft.zero_init=true",
    "optim.epochs=8", "optim.batch_size=2", "optim.optimizer=adam", "optim.lr_decoder=1e-4",
    "optim.lr_adapter=1e-3", "optim.weight_decay=0",
    "objective.masks_per_image=1", "objective.iterations=3", "objective.first_points=[1,1,3,5]",
    "data.box_expand=[0,0]", "data.box_shift=5", "data.box_component=largest",
    "run.val_every=4", "run.seed=0",
]
#: the two prompts the demo compares zero-shot and fine-tuned models on (the points are drawn once, then reused)
DEMO_PROMPTS = ("box", "points:1")
#: embedded data: 60 synthetic lesion images (36 train / 12 val / 12 test) at 128 px
DEMO_IMAGES, DEMO_SIZE = 60, 128


def run_finetune_demo(out: Path, data: Path | None = None, device: str = "auto",
                      overrides: list[str] | tuple[str, ...] = (), zero_shot: str = "litemedsam") -> dict:
    """Fine-tune SAM-Med2D briefly on ``data`` (default: the synthetic lesions), then score zero-shot LiteMedSAM
    and the fine-tuned model side by side on the test split, from the tight box and from one random foreground
    point (the same points for both); returns a summary with ``compare`` = ``{prompt: {"zero_shot": Dice,
    "fine_tuned": Dice}}`` and one report (with best/median/worst overlays) per model and prompt.

    ``overrides`` (``KEY=VALUE``) apply after the demo's own settings; ``zero_shot`` is the model compared with
    (tests use a tiny backbone for both).
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
            make_synthetic_lesions(data, n=DEMO_IMAGES, size=DEMO_SIZE, seed=0)
    size = DEMO_SIZE if synthetic else 256
    cfg = load_config(None, DEMO_OVERRIDES + [f"data.image_size={size}", f"run.device={device}", *overrides])
    run_dir = out / "sam_med2d_run"
    result = run_training(cfg, data, run_dir, resume=ckpt.has_run(run_dir))
    compare: dict[str, dict[str, float]] = {}
    reports: dict[str, str] = {}
    for prompt in DEMO_PROMPTS:
        tag = prompt.replace(":", "")
        prompts_file = None
        for name, source in (("fine_tuned", {"run": str(run_dir), "model": None}),
                             ("zero_shot", {"run": None, "model": zero_shot})):
            report = out / "report" / f"{name}_{tag}"
            summary = run_evaluation(**source, checkpoint=None, data=data, split="test", sizes=[None], sweep=False,
                                     out=report, device=device, prompt=prompt, prompts_file=prompts_file)
            if prompt.startswith("points"):
                prompts_file = report / "prompts.json"  # the zero-shot model sees the fine-tuned one's points
            compare.setdefault(prompt, {})[name] = round(float(summary["dice"]), 4)
            reports[f"{name} {prompt}"] = summary["report"]
    return {"data": str(Path(data).resolve()), "synthetic": synthetic, "run": str(run_dir.resolve()),
            "train_seconds": round(result.seconds, 1), "best_val_dice": result.best_score,
            "split": "test", "metric": "Dice per mask, native grid", "compare": compare, "reports": reports}


def run_demo(out: Path, data: Path | None = None, device: str = "auto") -> dict:
    """Run the demo; prints one JSON line per step and returns them."""
    out = Path(out)
    if data is not None and not Path(data).exists():
        raise ImedsamError(f"--data: folder not found: {data}")
    out.mkdir(parents=True, exist_ok=True)
    results = {"zero_shot_ct": run_zero_shot_ct(out, device)}
    print(json.dumps({"step": "zero_shot_ct", **results["zero_shot_ct"]}), flush=True)
    results["finetune"] = run_finetune_demo(out, None if data is None else Path(data), device)
    print(json.dumps({"step": "finetune_and_compare", **results["finetune"]}), flush=True)
    return results
