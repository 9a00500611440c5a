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
from imedsam.runtime import autocast_dtype, resolve_device
from imedsam.train import checkpoint as ckpt
from imedsam.train.config import TrainConfig, config_to_dict
from imedsam.train.ema import ParameterEMA
from imedsam.train.objectives import Objective

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(system, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam) over the system's parameter groups: ``"decoder"`` at ``optim.lr_decoder``, ``"adapters"``
    at ``optim.lr_adapter`` (:meth:`imedsam.models.base.SegmentationSystem.param_groups`)."""
    lrs = {"decoder": cfg.optim.lr_decoder, "adapters": cfg.optim.lr_adapter}
    groups = [{"params": params, "lr": lrs[name], "name": name}
              for name, params in system.param_groups().items() if params]
    if not groups:
        raise ImedsamError("model has no trainable parameters: check the model config (peft/decoder settings)")
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.optim.weight_decay)
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


def train(system, objective_cls: type[Objective], train_set, val_fn, cfg: TrainConfig, run_dir: Path, *,
          resume: bool = False) -> TrainResult:
    """Train ``system`` on ``train_set`` with its objective; ``val_fn(system) -> dict`` (with a ``dice`` key)
    scores it on ``val``. The loop knows no method: ``objective.steps(batch)`` yields one loss per optimizer step.

    ``train_set[i]`` is what the objective reads (:mod:`imedsam.data.dataset`, :mod:`imedsam.data.objects`).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.run.device)
    amp = autocast_dtype(device, cfg.run.precision)
    system.to(device)
    seed_everything(cfg.run.seed)
    objective = objective_cls(system, cfg, device, amp)
    optimizer = build_optimizer(system, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.optim.batch_size)
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
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
        losses, logs = [], {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", leave=False,
                   dynamic_ncols=True)
        for batch in bar:
            if cfg.optim.max_steps is not None and step >= cfg.optim.max_steps:
                break
            for loss, logs in objective.steps(batch, epoch=epoch, step=step):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                  **{k: v for k, v in logs.items() if k == "coarse_weight"},
                  "lr": [g["lr"] for g in optimizer.param_groups],
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
