"""Kvasir-Sessile: zero-shot LiteMedSAM vs I-MedSAM fine-tuned on LiteMedSAM, side by side (JSON lines).

Protocol: ``../shared/data/kvasir-sessile`` with its ``splits.json`` (118 train / 39 val / 39 test, 256x256);
I-MedSAM trained on ``train`` (config ``configs/imedsam-sessile.yaml`` + the overrides below), the best checkpoint
chosen on ``val`` Dice only, both methods reported on ``test``; prompt = tight box of the ground-truth mask
(half-open: one past the last foreground column/row, as COCO/SA-1B boxes), prediction directly on the native 256x256
grid, fp32, Dice/IoU per image averaged over images, HD95 in pixels (MONAI convention: max of the two directed 95th
percentiles). Training time is wall clock on this machine (2 threads). On CPUs with native bf16 the trained model is
also scored with bf16 autocast (inference only), to show whether ``--precision auto`` keeps the accuracy. Both
methods are also scored with predicted components under 16 px removed (``imedsam evaluate --min-component 16``).
Dice is also given separately for images whose ground truth is one polyp and for those with several separate polyps
inside the one box (components holding >= 5 % of the foreground), the ambiguous prompts where most of the error is.
Last, flip test-time augmentation (``imedsam evaluate --tta``): the candidates none, h, h,v and h,v,hv are scored on
``val`` with the trained model, the best is chosen there, and both methods are scored on ``test`` with it.

    python benchmarks/sessile.py [--out runs/sessile] [--resume] [KEY=VALUE overrides]
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
DATA = ROOT.parent / "shared" / "data" / "kvasir-sessile"
DEFAULT_OVERRIDES = ["run.precision=fp32"]
MIN_COMPONENT = 16  # the post-processed lines: predicted components < 16 px removed (--min-component 16)
TTA_CANDIDATES = ("none", "h", "h,v", "h,v,hv")  # nested: each adds one flipped view to the one before


def select_tta(system, cases, device) -> tuple[str, dict]:
    """Choose the flip test-time augmentation on ``cases`` (val): mean Dice of each candidate, the best (the
    fewest views on ties). Every image is encoded once per view; the candidates average prefixes of the views."""
    import numpy as np

    from imedsam.evaluate.metrics import binary_metrics
    from imedsam.evaluate.protocol import view_logits
    from imedsam.models.views import mean_over_views, parse_tta

    views = parse_tta(TTA_CANDIDATES[-1])
    dice = {name: [] for name in TTA_CANDIDATES}
    for case in cases:
        logits = view_logits(system, case, sizes=[None], device=device, views=views)[0]
        for n_views, name in enumerate(TTA_CANDIDATES, start=1):
            dice[name].append(binary_metrics((mean_over_views(logits[:n_views]) > 0).numpy(), case.gt)["dice"])
    means = {name: round(float(np.mean(v)), 4) for name, v in dice.items()}
    return max(TTA_CANDIDATES, key=lambda name: (means[name], -len(name))), means


def score(system, cases, device, amp=None, min_component: int = 0, tta: str = "none") -> dict:
    import numpy as np

    from imedsam.evaluate.protocol import evaluate_cases
    from imedsam.models.views import parse_tta

    start = time.perf_counter()
    rows = evaluate_cases(system, cases, sizes=[None], device=device, amp_dtype=amp, seed=0, progress=False,
                          min_component=min_component, views=parse_tta(tta))
    out = {"n": len(rows), "seconds_per_image": round((time.perf_counter() - start) / max(len(rows), 1), 2)}
    for key in ("dice", "iou", "hd95"):
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = round(float(np.nanmean(values)), 4)
    # the ambiguous prompts: one box around several separate polyps (see imedsam.evaluate.protocol)
    for label, group in (("one_polyp", [r for r in rows if r["gt_components"] == 1]),
                         ("several_polyps", [r for r in rows if r["gt_components"] > 1])):
        out[f"dice_{label}"] = round(float(np.mean([r["dice"] for r in group])), 4) if group else None
        out[f"n_{label}"] = len(group)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(ROOT / "runs" / "sessile"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="only evaluate an existing run")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from imedsam.data import SegmentationDataset, discover
    from imedsam.models.registry import build_system
    from imedsam.data.cases import dataset_cases
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    torch.set_num_threads(2)
    # per-epoch training records (loss, val Dice, seconds) on stderr; the JSON lines stay on stdout
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.data).is_dir():
        sys.exit(f"sessile benchmark: data folder not found: {args.data}")
    device = torch.device("cpu")
    index = discover(args.data)
    test_cases = dataset_cases(SegmentationDataset(index, split="test"))
    protocol = {"data": "kvasir-sessile", "split": "test", "prompt": "tight GT box (half-open xyxy)",
                "grid": "native 256x256", "precision": "fp32"}

    zero_shot = build_system("litemedsam").eval()
    print(json.dumps({"benchmark": "sessile", "method": "LiteMedSAM zero-shot", **protocol,
                      **score(zero_shot, test_cases, device)}), flush=True)
    print(json.dumps({"benchmark": "sessile", "method": "LiteMedSAM zero-shot", **protocol,
                      "postprocess": f"components < {MIN_COMPONENT} px removed",
                      **score(zero_shot, test_cases, device, min_component=MIN_COMPONENT)}), flush=True)

    cfg = load_config(ROOT / "configs" / "imedsam-sessile.yaml", DEFAULT_OVERRIDES + args.overrides)
    seconds = None
    if not args.skip_train:
        start = time.perf_counter()
        result = run_training(cfg, args.data, args.out, resume=args.resume)
        seconds = time.perf_counter() - start
        print(json.dumps({"benchmark": "sessile", "event": "trained", "run": args.out,
                          "best_val_dice": result.best_score, "epochs": result.epochs_done,
                          "train_minutes": round(seconds / 60, 1),
                          "history": [{k: h.get(k) for k in ("epoch", "train_loss", "val", "seconds")}
                                      for h in result.history]}), flush=True)
    trained = build_system("imedsam", adapter=args.out).eval()
    print(json.dumps({"benchmark": "sessile", "method": "I-MedSAM (LiteMedSAM backbone)", **protocol,
                      "selection": "best val Dice", "overrides": DEFAULT_OVERRIDES + args.overrides,
                      "train_minutes": None if seconds is None else round(seconds / 60, 1),
                      **score(trained, test_cases, device)}), flush=True)
    print(json.dumps({"benchmark": "sessile", "method": "I-MedSAM (LiteMedSAM backbone)", **protocol,
                      "selection": "best val Dice", "postprocess": f"components < {MIN_COMPONENT} px removed",
                      **score(trained, test_cases, device, min_component=MIN_COMPONENT)}), flush=True)
    from imedsam.runtime import cpu_has_fast_bf16

    if cpu_has_fast_bf16():  # does bf16 autocast (what --precision auto picks on this CPU) keep the accuracy?
        print(json.dumps({"benchmark": "sessile", "method": "I-MedSAM (LiteMedSAM backbone)", **protocol,
                          "precision": "bf16 autocast (inference only)", "selection": "best val Dice",
                          **score(trained, test_cases, device, torch.bfloat16)}), flush=True)

    # flip test-time augmentation (imedsam evaluate --tta): chosen on val Dice, then both methods scored with it
    tta, val_dice = select_tta(trained, dataset_cases(SegmentationDataset(index, split="val")), device)
    print(json.dumps({"benchmark": "sessile", "event": "tta selected", "split": "val", "method": "I-MedSAM",
                      "val_dice": val_dice, "tta": tta}), flush=True)
    for method, system in (("LiteMedSAM zero-shot", zero_shot), ("I-MedSAM (LiteMedSAM backbone)", trained)):
        print(json.dumps({"benchmark": "sessile", "method": method, **protocol, "tta": tta,
                          "selection": "best val Dice; tta chosen on val",
                          **score(system, test_cases, device, tta=tta)}), flush=True)


if __name__ == "__main__":
    main()
