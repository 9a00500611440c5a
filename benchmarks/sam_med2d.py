"""SAM-Med2D in imedsam, side by side with zero-shot LiteMedSAM and I-MedSAM, on real data (JSON lines).

Protocols (``imedsam evaluate --prompt ...``, :mod:`imedsam.data.interaction`):

* ``box``: the tight (half-open) box of the ground truth;
* ``points:1``, ``points:3``, ``points:5``: random points from the ground truth as SAM-Med2D's test (1 = one
  foreground pixel; 3 = 1 foreground + 2 background; 5 = 2 + 3), drawn once per dataset with seed 0 and reused
  for every model (the prompts.json of the first model);
* ``clicks:5``: 5 corrective clicks, each at the interior-most pixel of the largest error region, the previous
  logits as mask prompt for models that take one (SAM decoders); Dice after each click, NoC@85 and NoC@90
  (capped at 5).

Metrics: Dice per mask (object of an image) averaged over masks, and the per-image mean; on the ground truth's
grid (native resolution); inference with ``--precision`` (default auto: bf16 autocast on CPUs with native bf16).

Datasets:

* ``kvasir``: ``../shared/data/kvasir-sessile`` with its ``splits.json`` (118 train / 39 val / 39 test, 256x256
  RGB); test split, all 39 images.
* ``la``: ``../shared/data/la-mri`` (nnU-Net layout, left atrium, LGE-MRI), axial slices (axis 0 of the ZYX
  arrays). Training on the ``imagesTr`` volumes' slices with >= 10 atrium pixels (one of the 12 volumes held out
  to validate, ``data.val_fraction``), test on the ``imagesTs`` volumes' slices whose atrium has >= 100 pixels.

Models: zero-shot ``litemedsam``; I-MedSAM (``configs/imedsam-sessile.yaml``; on LA the same recipe, its length
set by ``--imedsam-la-epochs``); SAM-Med2D on LiteMedSAM (``configs/sam-med2d-kvasir.yaml``,
``configs/sam-med2d-la.yaml``). Training time is wall clock on this machine; runs are resumed/reused when their
folder exists.

    python benchmarks/sam_med2d.py [--out runs/m2d] [--datasets kvasir,la] [--skip-train] [--limit N] [--stride K]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "kvasir": {"data": DATA / "kvasir-sessile", "test_min_foreground": 1,
               "configs": {"imedsam": ("configs/imedsam-sessile.yaml", ["run.precision=fp32"]),
                           "sam_med2d": ("configs/sam-med2d-kvasir.yaml", [])}},
    "la": {"data": DATA / "la-mri", "test_min_foreground": 100,
           "configs": {"imedsam": ("configs/imedsam-sessile.yaml", ["run.precision=fp32"]),
                       "sam_med2d": ("configs/sam-med2d-la.yaml", [])}},
}
PROTOCOLS = ("box", "points:1", "points:3", "points:5", "clicks:5")


def train_run(config: str, overrides: list[str], data: Path, out: Path) -> dict:
    """Train (or finish, or reuse) a run; returns its wall time and best validation score."""
    from imedsam.train import checkpoint as ckpt
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    cfg = load_config(ROOT / config, overrides)
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:
        import torch

        state = torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
        if int(state["epoch"]) + 1 >= cfg.optim.epochs or (cfg.optim.max_steps or 1 << 30) <= int(state["step"]):
            return {"run": str(out), "reused": True}
    start = time.perf_counter()
    result = run_training(cfg, data, out, resume=ckpt.has_run(out))
    return {"run": str(out), "train_minutes": round((time.perf_counter() - start) / 60, 1),
            "best_val_dice": result.best_score, "epochs": result.epochs_done,
            "steps": result.history[-1]["step"] if result.history else None}


def score(name: str, system, cases, device, amp, prompts: dict) -> dict:
    """All protocols on one model; fills ``prompts`` (the points drawn by the first model) for the next ones."""
    from imedsam.data.interaction import parse_protocol
    from imedsam.evaluate.api import click_summary, per_image_mean
    from imedsam.evaluate.metrics import summarize
    from imedsam.evaluate.protocol import evaluate_protocols

    protocols = [parse_protocol(p) for p in PROTOCOLS]
    start = time.perf_counter()
    out = evaluate_protocols(system, cases, protocols, sizes=[None], device=device, amp_dtype=amp, seed=0,
                             progress=True, prompts=prompts or None)
    seconds = time.perf_counter() - start
    lines = {}
    for protocol in protocols:
        rows, used = out[protocol.name]
        if protocol.kind == "points" and protocol.name not in prompts:
            prompts[protocol.name] = used
        s = summarize(rows)
        line = {"model": name, "protocol": protocol.name, "cases": len(rows),
                "dice": round(s["dice"]["mean"], 4), "dice_per_image": round(per_image_mean(rows, "dice"), 4),
                "nsd": round(s["nsd"]["mean"], 4),
                "hd95": None if s["hd95"]["mean"] is None else round(s["hd95"]["mean"], 2)}
        if protocol.kind == "clicks":
            line.update(click_summary(rows, protocol.n))
        lines[protocol.name] = line
    lines["_seconds"] = round(seconds, 1)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "m2d"))
    parser.add_argument("--datasets", default="kvasir,la")
    parser.add_argument("--skip-train", action="store_true", help="score the runs already in --out")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test cases (smoke runs)")
    parser.add_argument("--stride", type=int, default=1,
                        help="score every K-th test case (a subsample spread over all test images/volumes)")
    parser.add_argument("--imedsam-la-epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="inference precision (auto | fp32 | bf16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from imedsam.data import SegmentationDataset, discover
    from imedsam.data.cases import dataset_cases
    from imedsam.models.registry import build_system
    from imedsam.runtime import autocast_dtype, prepare_for_inference, resolve_device

    device = resolve_device("cpu")
    amp = autocast_dtype(device, args.precision)
    out = Path(args.out)
    for name in args.datasets.split(","):
        spec = DATASETS[name]
        data = spec["data"]
        if not data.is_dir():
            print(json.dumps({"dataset": name, "skipped": f"{data} not found"}), flush=True)
            continue
        runs = {}
        for model, (config, overrides) in spec["configs"].items():
            run_dir = out / f"{name}_{model}"
            extra = [f"optim.epochs={args.imedsam_la_epochs}"] if (name, model) == ("la", "imedsam") else []
            if not args.skip_train:
                info = train_run(config, overrides + extra, data, run_dir)
                print(json.dumps({"dataset": name, "train": model, **info}), flush=True)
            runs[model] = run_dir
        index = discover(data)
        cases = dataset_cases(SegmentationDataset(index, split="test", min_foreground=spec["test_min_foreground"]),
                              limit=args.limit)[:: max(1, args.stride)]
        prompts: dict = {}
        results = {}
        for model in ("litemedsam", "imedsam", "sam_med2d"):
            system = build_system("litemedsam") if model == "litemedsam" else build_system(adapter=runs[model])
            prepare_for_inference(system, device, amp)
            results[model] = score(model, system, cases, device, amp, prompts)
            for protocol in PROTOCOLS:
                print(json.dumps({"dataset": name, **results[model][protocol]}), flush=True)
            print(json.dumps({"dataset": name, "model": model, "eval_seconds": results[model]["_seconds"]}),
                  flush=True)
        (out / f"{name}_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
