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


#: config keys a resume may change without breaking exact resumption
RESUME_FREE_KEYS = ("run.device", "data.num_workers")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def precheck_run(run_dir: str | Path, resume: bool) -> None:
    """The cheap checks of the output folder, before any data is read or model built: a folder (not a file),
    writable, not holding a run unless ``resume`` (a resume of a folder without a run starts it, so a job that
    always passes --resume, e.g. a requeued cluster job, works from its first start)."""
    from imedsam.io.atomic import check_writable

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ImedsamError(f"--out: {run_dir} is a file; give a folder for the run")
    check_writable(run_dir / ckpt.CONFIG_FILE, "--out")
    if not resume and ckpt.has_run(run_dir):
        raise ImedsamError(f"--out: {run_dir} already holds a run; pass --resume to continue it or choose another "
                           "--out")


def _open_run(run_dir: Path, cfg: TrainConfig, *, resume: bool, data, allow_config_change: bool) -> dict | None:
    """Check the output folder and the run it holds; record a new run; on resume return the newest checkpoint's
    state (with ``_folder``), or None to start from the beginning."""
    import yaml

    from imedsam import __version__
    from imedsam.io.atomic import atomic_write

    precheck_run(run_dir, resume)
    ckpt.clean_stale(run_dir)
    data_path = None if data is None else str(Path(data).resolve())
    new_config = config_to_dict(cfg)
    run_file = run_dir / ckpt.RUN_FILE
    if resume and not ckpt.has_run(run_dir):
        log.warning("--resume: %s holds no run yet; starting it", run_dir)
        resume = False
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_yaml(run_dir / ckpt.CONFIG_FILE, new_config)
        info = {"data": data_path, "imedsam": __version__, "resumes": []}
        atomic_write(run_file, lambda t: t.write_text(json.dumps(info, indent=1)))
        return None
    info = json.loads(run_file.read_text()) if run_file.exists() else {"data": None, "resumes": []}
    if (run_dir / ckpt.CONFIG_FILE).exists():
        old = _flat(yaml.safe_load((run_dir / ckpt.CONFIG_FILE).read_text()) or {})
        new = _flat(new_config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS)
        if info.get("data") and data_path and info["data"] != data_path:
            changed.append(f"--data ({info['data']} -> {data_path})")
        if changed:
            if not allow_config_change:
                raise ImedsamError(f"--resume: the config differs from the run's ({', '.join(changed[:6])}"
                                   f"{' ...' if len(changed) > 6 else ''}): a resume is exact only with the same "
                                   "config and data; pass --allow-config-change to continue anyway (both configs "
                                   "are kept)")
            name = f"config.resume-{len(info.get('resumes', [])) + 1}.yaml"
            ckpt.save_yaml(run_dir / name, new_config)
            info.setdefault("resumes", []).append({"config": name, "changed": changed, "data": data_path})
            atomic_write(run_file, lambda t: t.write_text(json.dumps(info, indent=1)))
            log.warning("--resume with a changed config (%s): recorded in %s", ", ".join(changed), name)
    else:
        ckpt.save_yaml(run_dir / ckpt.CONFIG_FILE, new_config)
    folder = ckpt.latest_checkpoint(run_dir)
    if folder is None and (run_dir / ckpt.STATE_FILE).exists():  # a run of the first format
        folder = run_dir
    if folder is None:
        log.warning("--resume: %s has no complete checkpoint yet; starting it from the beginning", run_dir)
        return None
    state = ckpt.load_train_state(folder / ckpt.STATE_FILE)
    state["_folder"] = folder
    return state


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_score: float | None
    history: list[dict]
    seconds: float


def train(system, objective_cls: type[Objective], train_set, val_fn, cfg: TrainConfig, run_dir: Path, *,
          resume: bool = False, data: str | Path | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train ``system`` on ``train_set`` with its objective; ``val_fn(system) -> dict`` (with a ``dice`` key)
    scores it on ``val``. The loop knows no method: ``objective.steps(batch)`` yields one loss per optimizer step.

    ``train_set[i]`` is what the objective reads (:mod:`imedsam.data.dataset`, :mod:`imedsam.data.objects`).
    Checkpoints: :mod:`imedsam.train.checkpoint` (one complete unit per epoch; ``resume`` takes the newest). A
    resume must use the run's config and data (``allow_config_change`` records the new config beside the old).
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
    state = _open_run(run_dir, cfg, resume=resume, data=data, allow_config_change=allow_config_change)
    if state is not None:
        folder = state.pop("_folder")
        system.load_trainable(folder / ckpt.ADAPTER_FILE)
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
        log.info("resuming %s after epoch %d (step %d) from %s", run_dir, start_epoch - 1, step, folder.name)
        if folder != run_dir:  # a kill may have come between the checkpoint and its top-level copy
            system.save_trainable(run_dir / ckpt.ADAPTER_FILE, config_to_dict(cfg))
        if start_epoch >= cfg.optim.epochs or (cfg.optim.max_steps is not None and step >= cfg.optim.max_steps):
            log.warning("--resume: %s has already finished (%d epochs, step %d); nothing to do", run_dir,
                        start_epoch, step)

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
        # one unit: weights and the state that goes with them, renamed into place together
        ckpt.write_checkpoint(run_dir, epoch, lambda p: system.save_trainable(p, config_to_dict(cfg)), {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
            "epoch": epoch, "step": step, "best": best, "history": json.dumps(history),
            **({"ema": ema.state_dict()} if ema is not None else {})})
        system.save_trainable(run_dir / ckpt.ADAPTER_FILE, config_to_dict(cfg))  # the newest weights, for --adapter
    return TrainResult(run_dir=run_dir, epochs_done=len(history), best_score=best, history=history,
                       seconds=time.perf_counter() - started)
