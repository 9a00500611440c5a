"""The training loop: seeded, resumable, validated on ``val`` only.

Reproducibility contract: every random choice of epoch ``e`` (shuffle order, augmentation, box jitter, sampled
query points, dropout) derives from ``(seed, e)`` and from the RNG state saved at the end of epoch ``e - 1``.
A run interrupted at any point and resumed with ``--resume`` therefore restarts the interrupted epoch from the
state saved at its start and ends with the same weights as the uninterrupted run.

Multi-process runs (``dist``, :mod:`imedsam.train.distributed`): ``optim.batch_size`` is the global batch, shared
by the processes (:mod:`imedsam.train.shards`); gradients are summed after each backward
(:mod:`imedsam.train.sync`); rank 0 alone validates and writes the run folder, the others wait for it on the
host group; each checkpoint holds every process's RNG state (``rng_ranks``) and the number of processes.

Time budget (``optim.max_minutes``): training stops after the optimizer step during which the run's wall clock
(its training and validations, summed over resumes: ``train_seconds`` in each checkpoint) passes the budget; that
partial epoch is then validated (best checkpoint kept as usual) and checkpointed, and its record says
``"stopped"``. The final validation and checkpoint come on top of the budget. A stop by time is not reproducible
step for step (it depends on the machine's speed); without a budget nothing changes.
"""

from __future__ import annotations

import itertools
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
from imedsam.train import shards, sync
from imedsam.train.config import TrainConfig, config_to_dict
from imedsam.train.distributed import DistContext, broadcast_object, gather_objects, on_main, rank_seed
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
    #: the process's rank in a multi-process run (0: the main process, or a single process)
    rank: int = 0


def _resume_rng(state: dict, dist: DistContext | None, allow_config_change: bool, run_dir: Path) -> dict | None:
    """The RNG state this process resumes from: the saved one of its rank (None: keep the fresh seeding). A run
    resumed on another number of processes cannot repeat its random draws: refused unless
    ``allow_config_change``."""
    world = 1 if dist is None else dist.world_size
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        if not allow_config_change:
            raise ImedsamError(f"--resume: {run_dir} was trained by {saved_world} process(es), this launch has "
                               f"{world}: the global batch is the same but the processes' random states are not; "
                               "launch as many processes, or pass --allow-config-change to continue anyway")
        log.warning("--resume on %d process(es) of a run trained on %d: random draws differ from the "
                    "uninterrupted run", world, saved_world)
    rank = 0 if dist is None else dist.rank
    per_rank = state.get("rng_ranks")
    if per_rank is not None and rank < len(per_rank):
        return per_rank[rank]
    return state["rng"] if rank == 0 else None


def train(system, objective_cls: type[Objective], train_set, val_fn, cfg: TrainConfig, run_dir: Path, *,
          resume: bool = False, data: str | Path | None = None, allow_config_change: bool = False,
          dist: DistContext | None = None) -> TrainResult:
    """Train ``system`` on ``train_set`` with its objective; ``val_fn(system) -> dict`` (with a ``dice`` key)
    scores it on ``val``. The loop knows no method: ``objective.steps(batch)`` yields one loss per optimizer step.

    ``train_set[i]`` is what the objective reads (:mod:`imedsam.data.dataset`, :mod:`imedsam.data.objects`).
    Checkpoints: :mod:`imedsam.train.checkpoint` (one complete unit per epoch; ``resume`` takes the newest). A
    resume must use the run's config and data (``allow_config_change`` records the new config beside the old).
    ``dist``: this process of a multi-process run (module docstring); None: a single process.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.run.device) if dist is None else dist.device
    amp = autocast_dtype(device, cfg.run.precision)
    world = 1 if dist is None else dist.world_size
    if dist is not None:
        shards.per_rank_batch(cfg.optim.batch_size, world)
        sync.global_batchnorm(system, skip=getattr(system, "batch_conditional_modules", ()))
    system.to(device)
    seed_everything(cfg.run.seed if dist is None else rank_seed(cfg.run.seed, dist.rank))
    objective = objective_cls(system, cfg, device, amp)
    optimizer = build_optimizer(system, cfg)
    steps_per_epoch = shards.steps_per_epoch(len(train_set), cfg.optim.batch_size, world)
    budget = None if cfg.optim.max_minutes is None else 60.0 * cfg.optim.max_minutes  # seconds
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = ParameterEMA(system, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    if dist is not None and dist.is_main and steps_per_epoch < math.ceil(len(train_set) / cfg.optim.batch_size):
        log.warning("the last batch of each epoch has %d item(s), fewer than the %d processes: it is skipped",
                    len(train_set) % cfg.optim.batch_size, world)

    start_epoch, step, best, history = 0, 0, None, []
    spent = 0.0  # wall-clock seconds of the earlier invocations of this run (optim.max_minutes counts them)
    main_state: dict = {}

    def open_run() -> str | None:  # rank 0 (or the single process): check, record, find the checkpoint
        main_state["state"] = _open_run(run_dir, cfg, resume=resume, data=data,
                                        allow_config_change=allow_config_change)
        return None if main_state["state"] is None else str(main_state["state"]["_folder"])

    folder_name = on_main(dist, open_run)
    state = main_state.get("state")
    if state is None and folder_name is not None:  # another process: read the checkpoint rank 0 chose
        state = {**ckpt.load_train_state(Path(folder_name) / ckpt.STATE_FILE), "_folder": Path(folder_name)}
    if state is not None:
        folder = state.pop("_folder")
        system.load_trainable(folder / ckpt.ADAPTER_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = _resume_rng(state, dist, allow_config_change, run_dir)
        if rng is not None:
            ckpt.set_rng_state(rng)
        if ema is not None:
            if "ema" not in state:
                raise ImedsamError(f"--resume: {run_dir} was trained without optim.ema_decay; resume it without")
            ema.load_state_dict(state["ema"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        spent = float(state.get("train_seconds", 0.0))
        best = None if state["best"] is None else float(state["best"])
        history = json.loads(state["history"])
        log.info("resuming %s after epoch %d (step %d) from %s", run_dir, start_epoch - 1, step, folder.name)
        if folder != run_dir and (dist is None or dist.is_main):  # a kill may have come between the checkpoint
            system.save_trainable(run_dir / ckpt.ADAPTER_FILE, config_to_dict(cfg))  # and its top-level copy
        if (start_epoch >= cfg.optim.epochs or (cfg.optim.max_steps is not None and step >= cfg.optim.max_steps)
                or (budget is not None and spent >= budget)):
            log.warning("--resume: %s has already finished (%d epochs, step %d); nothing to do", run_dir,
                        start_epoch, step)
    if dist is not None:
        sync.broadcast_parameters(params, dist)  # the same starting weights everywhere, whatever happened above

    started = time.perf_counter()
    stopped = budget is not None and spent >= budget  # optim.max_minutes spent

    def out_of_time() -> bool:
        """Whether optim.max_minutes is spent; in a multi-process run rank 0's clock decides for every process."""
        over = budget is not None and spent + time.perf_counter() - started >= budget
        return over if dist is None else bool(broadcast_object(dist, over))

    for epoch in range(start_epoch, cfg.optim.epochs):
        if stopped or (cfg.optim.max_steps is not None and step >= cfg.optim.max_steps):
            break
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        if dist is None:
            shuffle = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
            loader = DataLoader(train_set, batch_size=cfg.optim.batch_size, shuffle=True, generator=shuffle,
                                num_workers=cfg.data.num_workers, drop_last=False)
            parts = itertools.repeat(None)
        else:  # this process's part of each global batch of the single-process order
            plan = shards.rank_batches(len(train_set), cfg.optim.batch_size, cfg.run.seed, epoch, dist.rank, world)
            loader = DataLoader(train_set, batch_sampler=[indices for indices, _ in plan],
                                num_workers=cfg.data.num_workers)
            parts = iter([shard for _, shard in plan])
        system.train()
        losses, logs = [], {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", leave=False,
                   dynamic_ncols=True, disable=dist is not None and not dist.is_main)
        for batch, shard in zip(bar, parts):
            if cfg.optim.max_steps is not None and step >= cfg.optim.max_steps:
                break
            part = {} if shard is None else {"shard": shard}
            for loss, logs in objective.steps(batch, epoch=epoch, step=step, **part):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if dist is not None:
                    loss = sync.reduce_gradients(params, loss, dist)  # the global batch's gradient and loss
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if budget is not None and out_of_time():
                stopped = True
                break
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                  **{k: v for k, v in logs.items() if k == "coarse_weight"},
                  "lr": [g["lr"] for g in optimizer.param_groups],
                  "seconds": round(time.perf_counter() - started, 1),
                  **({"stopped": f"optim.max_minutes={cfg.optim.max_minutes:g} spent"} if stopped else {})}
        # every process's RNG state, gathered before rank 0 validates (rank 0's own is taken after, as alone)
        rng_ranks = None if dist is None else gather_objects(dist, ckpt.rng_state())

        def finish_epoch(epoch: int = epoch, step: int = step, record: dict = record,
                         rng_ranks: list | None = rng_ranks):
            """Validate, record, write the checkpoint: rank 0 (or the single process) only."""
            nonlocal best
            last = epoch + 1 == cfg.optim.epochs or "stopped" in record  # the budget's stop validates too
            if val_fn is not None and ((epoch + 1) % cfg.run.val_every == 0 or last):
                system.eval()
                with ema.applied() if ema is not None else nullcontext():  # validate and keep the average
                    val = val_fn(system)
                    record["val"] = val
                    if best is None or val["dice"] > best:
                        best = float(val["dice"])
                        system.save_trainable(run_dir / ckpt.BEST_ADAPTER_FILE, config_to_dict(cfg))
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, json.dumps(record))
            rng = ckpt.rng_state()
            ranks = {} if rng_ranks is None else {"rng_ranks": [rng, *rng_ranks[1:]], "world_size": world}
            # one unit: weights and the state that goes with them, renamed into place together
            ckpt.write_checkpoint(run_dir, epoch, lambda p: system.save_trainable(p, config_to_dict(cfg)), {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "epoch": epoch, "step": step, "best": best, "history": json.dumps(history),
                "train_seconds": spent + time.perf_counter() - started,
                **ranks, **({"ema": ema.state_dict()} if ema is not None else {})})
            system.save_trainable(run_dir / ckpt.ADAPTER_FILE, config_to_dict(cfg))  # the newest, for --adapter
            return record, best

        done, best = on_main(dist, finish_epoch)  # the others wait for the checkpoint, then take the record
        if dist is not None and not dist.is_main:
            history.append(done)
    return TrainResult(run_dir=run_dir, epochs_done=len(history), best_score=best, history=history,
                       seconds=time.perf_counter() - started, rank=0 if dist is None else dist.rank)
