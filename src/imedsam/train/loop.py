"""The training loop: seeded, resumable, validated on ``val`` only.

Reproducibility contract: every random choice of epoch ``e`` (shuffle order, augmentation, box jitter, sampled
query points, dropout) derives from ``(seed, e)`` and from the RNG state saved at the end of epoch ``e - 1``.
A run interrupted at any point and resumed with ``--resume`` therefore restarts the interrupted epoch from the
state saved at its start and ends with the same weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from imedsam.errors import ImedsamError
from imedsam.runtime import autocast, autocast_dtype, resolve_device
from imedsam.train import checkpoint as ckpt
from imedsam.train.config import TrainConfig, config_to_dict
from imedsam.train.ema import ParameterEMA
from imedsam.train.losses import BCEDiceLoss, coarse_weight

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(system, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the implicit decoder (``lr_decoder``) and everything else trainable (``lr_adapter``)."""
    decoder, others = [], []
    for name, param in system.named_parameters():
        if not param.requires_grad:
            continue
        (decoder if system.is_decoder_parameter(name) else others).append(param)
    groups = [{"params": decoder, "lr": cfg.optim.lr_decoder, "name": "decoder"},
              {"params": others, "lr": cfg.optim.lr_adapter, "name": "adapters"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ImedsamError("model has no trainable parameters: check the model config (peft/decoder settings)")
    return torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warm = cfg.optim.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.optim.schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.schedule == "linear":
            return 1.0 - 0.999 * progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_score: float | None
    history: list[dict]
    seconds: float


def train(system, train_set, val_fn, cfg: TrainConfig, run_dir: Path, *, resume: bool = False) -> TrainResult:
    """Train ``system`` on ``train_set``; ``val_fn(system) -> dict`` (with a ``dice`` key) scores it on ``val``.

    ``train_set[i]`` returns {"image": (3, S, S) float 0-255, "mask": (1, S, S) float {0,1}, "box": (4,) xyxy}.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.run.device)
    amp = autocast_dtype(device, cfg.run.precision)
    system.to(device)
    seed_everything(cfg.run.seed)
    optimizer = build_optimizer(system, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.optim.batch_size)
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    criterion = BCEDiceLoss(cfg.optim.bce_weight, cfg.optim.dice_weight)
    ema = ParameterEMA(system, cfg.optim.ema_decay) if cfg.optim.ema_decay else None

    start_epoch, step, best, history = 0, 0, None, []
    state_path = run_dir / ckpt.STATE_FILE
    if resume:
        state = ckpt.load_train_state(state_path)
        system.load_trainable(run_dir / ckpt.ADAPTER_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        if ema is not None:
            if "ema" not in state:
                raise ImedsamError(f"--resume: {run_dir} was trained without optim.ema_decay; resume it without")
            ema.load_state_dict(state["ema"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        best = None if state["best"] is None else float(state["best"])
        history = json.loads(state["history"])
        log.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch - 1, step)
    elif state_path.exists():
        raise ImedsamError(f"--out: {run_dir} already holds a run; pass --resume to continue it or choose "
                           "another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_yaml(run_dir / ckpt.CONFIG_FILE, config_to_dict(cfg))

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.optim.epochs):
        if cfg.optim.max_steps is not None and step >= cfg.optim.max_steps:
            break
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        shuffle = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=cfg.optim.batch_size, shuffle=True, generator=shuffle,
                            num_workers=cfg.data.num_workers, drop_last=False)
        system.train()
        w_coarse = coarse_weight(epoch, cfg.optim.coarse_warm_epochs)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", leave=False,
                   dynamic_ncols=True)
        for batch in bar:
            if cfg.optim.max_steps is not None and step >= cfg.optim.max_steps:
                break
            points_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
            images = system.preprocess.normalize_tensor(batch["image"].to(device))
            masks = batch["mask"].to(device).float()
            boxes = batch["box"].to(device).float()
            with autocast(device, amp):
                coarse, fine, targets = system.forward_train(
                    images, boxes, masks, n_points=cfg.optim.points_per_image,
                    boundary_fraction=cfg.optim.boundary_fraction, box_fraction=cfg.optim.box_fraction,
                    generator=points_gen)
            loss = w_coarse * criterion(coarse, targets) + (1 - w_coarse) * criterion(fine, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                  "coarse_weight": w_coarse, "lr": [g["lr"] for g in optimizer.param_groups],
                  "seconds": round(time.perf_counter() - started, 1)}
        if val_fn is not None and ((epoch + 1) % cfg.run.val_every == 0 or epoch + 1 == cfg.optim.epochs):
            system.eval()
            with ema.applied() if ema is not None else nullcontext():  # validate and keep the average
                val = val_fn(system)
                record["val"] = val
                if best is None or val["dice"] > best:
                    best = float(val["dice"])
                    system.save_trainable(run_dir / ckpt.BEST_ADAPTER_FILE, config_to_dict(cfg))
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        # weights first, then the state that points at them: a crash in between resumes from the older state
        system.save_trainable(run_dir / ckpt.ADAPTER_FILE, config_to_dict(cfg))
        ckpt.save_train_state(state_path, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
            "epoch": epoch, "step": step, "best": best, "history": json.dumps(history),
            **({"ema": ema.state_dict()} if ema is not None else {})})
    return TrainResult(run_dir=run_dir, epochs_done=len(history), best_score=best, history=history,
                       seconds=time.perf_counter() - started)
