"""`imedsam train` as a library call: build the system and datasets from a config, train, return the run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imedsam.errors import ImedsamError
from imedsam.train.config import TrainConfig
from imedsam.train.loop import TrainResult, seed_everything, train

log = logging.getLogger(__name__)


def dataset_cases(dataset, limit: int | None = None):
    """Turn ``SegmentationDataset`` items (original size) into evaluation cases; each keeps its item's box
    (tight, or jittered when the dataset jitters boxes)."""
    from imedsam.evaluate.protocol import EvalCase

    cases = []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        image = np.clip(item["image"].numpy().transpose(1, 2, 0), 0, 255).astype(np.uint8)
        gt = item["mask"].numpy()[0] > 0.5
        name = str(item["case_id"])
        if int(item.get("slice_index", -1)) >= 0:
            name += f"#z{int(item['slice_index'])}"
        if int(item.get("class_id", 1)) != 1:
            name += f"#c{int(item['class_id'])}"
        spacing = item["spacing"].tolist() if "spacing" in item else [float("nan")] * 2
        known = all(np.isfinite(spacing))
        slice_index = int(item.get("slice_index", -1))
        cases.append(EvalCase(case_id=name, image=image, gt=gt, spacing=tuple(spacing) if known else None,
                              box=item["box"].numpy().astype(np.float64), stem=str(item["case_id"]),
                              class_id=int(item.get("class_id", 1)),
                              slice_index=slice_index if slice_index >= 0 else None))
    return cases


def run_training(cfg: TrainConfig, data: str | Path, out: str | Path, *, resume: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``data`` (train split), select on the val split, write the run to ``out``."""
    from imedsam.data import SegmentationDataset, discover
    from imedsam.evaluate.protocol import evaluate_cases
    from imedsam.models.imedsam import build_imedsam
    from imedsam.runtime import autocast_dtype, resolve_device

    if cfg.model.system != "imedsam":
        raise ImedsamError(f"config model.system={cfg.model.system!r}: only 'imedsam' is trainable so far")
    index = discover(data)
    if not index.has_splits:
        raise ImedsamError(f"--data: {data} has no splits (splits.json or nnU-Net imagesTr/imagesTs); add a "
                           "splits.json with train/val/test lists of file stems")
    size = (cfg.data.image_size, cfg.data.image_size)
    jitter = {"mode": "expand", "expand": tuple(cfg.data.box_expand)} if cfg.data.box_expand[1] > 0 else None
    train_set = SegmentationDataset(index, split=cfg.data.train_split, size=size, augment=cfg.data.augment or None,
                                    box_jitter=jitter, seed=cfg.run.seed, min_foreground=cfg.data.min_foreground)
    val_cases = []
    if cfg.data.val_split in index.counts():
        val_set = SegmentationDataset(index, split=cfg.data.val_split, min_foreground=cfg.data.min_foreground)
        val_cases = dataset_cases(val_set)
    else:
        log.warning("no %r split: the last checkpoint is kept, none is selected", cfg.data.val_split)
    if cfg.model.img_size is None:  # the encoder runs at the training grid; saved so inference rebuilds it
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"img_size": cfg.data.image_size})})
    seed_everything(cfg.run.seed)  # the adapters' and decoder's random initialisation is seeded too
    system = build_imedsam(config=cfg.model)
    device = resolve_device(cfg.run.device)
    amp = autocast_dtype(device, cfg.run.precision)
    size_val = tuple(cfg.run.val_size) if cfg.run.val_size else None

    def validate(model) -> dict:
        rows = evaluate_cases(model, val_cases, sizes=[size_val], device=device, amp_dtype=amp,
                              seed=cfg.run.seed, progress=False)
        dice = [r["dice"] for r in rows]
        return {"dice": float(np.mean(dice)) if dice else 0.0, "n": len(dice)}

    return train(system, train_set, validate if val_cases else None, cfg, Path(out), resume=resume)
