"""`imedsam train` as a library call: build the system, its objective and the datasets from a config, train,
return the run. Nothing here knows a method: the system's registry entry names its objective, the objective says
what items it reads, the system says which prompt protocols validate it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imedsam.errors import ImedsamError
from imedsam.train.config import TrainConfig
from imedsam.train.loop import TrainResult, seed_everything, train

if TYPE_CHECKING:
    from imedsam.train.distributed import DistContext

log = logging.getLogger(__name__)


def hold_out_val(index, fraction: float, seed: int, train_split: str, val_split: str):
    """Without a ``val_split``: move a seeded ``fraction`` of the training cases (at least one) to it."""
    from dataclasses import replace

    from imedsam.data import split_ids

    train_ids = [c.case_id for c in index.cases if c.split == train_split]
    if fraction <= 0 or len(train_ids) < 2:
        return index
    n_val = max(1, int(round(fraction * len(train_ids))))
    chosen = set(split_ids(train_ids, (1 - n_val / len(train_ids), n_val / len(train_ids)), seed=seed)["val"])
    log.info("no %r split: %d of the %d training cases held out to validate on (data.val_fraction=%g, seed %d): "
             "%s", val_split, len(chosen), len(train_ids), fraction, seed, sorted(chosen))
    cases = tuple(replace(c, split=val_split) if c.case_id in chosen else c for c in index.cases)
    return replace(index, cases=cases)


def training_dataset(cfg: TrainConfig, index, objective_cls):
    """The training items the objective reads: one object per item, or ``masks_per_image`` objects per image."""
    from imedsam.data import SegmentationDataset
    from imedsam.data.objects import ObjectsDataset

    d = cfg.data
    size = (d.image_size, d.image_size)
    jitter = None
    if d.box_expand[1] > 0 or d.box_shift > 0:
        mode = "both" if d.box_expand[1] > 0 and d.box_shift > 0 else ("shift" if d.box_shift > 0 else "expand")
        jitter = {"mode": mode, "expand": tuple(d.box_expand), "shift": d.box_shift}
    augment = d.augmentation if d.augment else None
    if getattr(objective_cls, "items", None) == "stacks":
        from imedsam.data.stacks import StacksDataset

        box_prompt = getattr(getattr(cfg.model, "decoder", None), "prompt", "none") == "box"  # MA-SAM's box variant
        return StacksDataset(index, split=d.train_split, depth=cfg.model.stack_depth, size=size, augment=augment,
                             seed=cfg.run.seed, foreground_prob=cfg.objective.foreground_prob,
                             box_prompt=box_prompt, axes=tuple(cfg.model.stack_axes))
    common = dict(split=d.train_split, size=size, augment=augment, box_jitter=jitter, seed=cfg.run.seed,
                  min_foreground=d.min_foreground)
    masks_per_image = getattr(cfg.objective, "masks_per_image", None)
    if masks_per_image is None:
        return SegmentationDataset(index, **common)
    return ObjectsDataset(index, masks_per_image=masks_per_image, objects=d.objects,
                          min_fraction=d.min_object_fraction, box_component=d.box_component, cache_size=64,
                          **common)


def make_validator(val_cases, protocols, *, size, device, amp, seed):
    """``validate(system) -> {"dice": mean over the protocols, per protocol, "n"}`` (Dice per case, mean)."""
    from imedsam.data.interaction import encode_case, parse_protocol, run_case

    parsed = [parse_protocol(p) for p in protocols]

    def validate(system) -> dict:
        dice: dict[str, list[float]] = {p.name: [] for p in parsed}
        for i, case in enumerate(val_cases):
            encoded = encode_case(system, case, device=device, amp_dtype=amp)  # once for every protocol
            for protocol in parsed:
                res = run_case(system, case, protocol, sizes=[size], device=device, amp_dtype=amp, seed=seed,
                               index=i, encoded=encoded)
                gt = case.gt_on(res.preds[0].shape)
                s = int(res.preds[0].sum()) + int(gt.sum())
                dice[protocol.name].append(1.0 if s == 0 else 2.0 * int((res.preds[0] & gt).sum()) / s)
        out = {name: float(np.mean(v)) if v else 0.0 for name, v in dice.items()}
        return {"dice": float(np.mean(list(out.values()))), **({"by_protocol": out} if len(out) > 1 else {}),
                "n": len(val_cases)}

    return validate


def make_volume_validator(val_refs, *, device, amp, stride: int = 1):
    """Multi-class volume systems (MA-SAM): ``validate(system) -> {"dice", "n"}``, the mean over the val
    volumes of the mean over the classes present (in the ground truth or the prediction) of the 3-D Dice of
    ``argmax`` of :meth:`predict_volume` (prompt-free, or the box-prompted variant from the ground truth's tight
    3-D box; stacks centred on every ``stride``-th slice, across the model's ``stack_axes``)."""
    from imedsam.data.dataset import read_case
    from imedsam.data.volume_prompts import volume_box

    def validate(system) -> dict:
        scores = []
        for ref in val_refs:
            image, labels = read_case(ref)
            prompt = {"box3d": volume_box(labels > 0)} if getattr(system, "box_prompted", False) else {}
            if prompt.get("box3d", ()) is None:  # a box-prompted model has nothing to segment in an empty volume
                continue
            pred = system.predict_volume(image, device=device, amp_dtype=amp, stride=stride,
                                         **prompt).argmax(0).numpy()
            dice = []
            for c in sorted(set(np.unique(labels).tolist()) | set(np.unique(pred).tolist()) - {0}):
                g, p = labels == c, pred == c
                dice.append(2.0 * float((g & p).sum()) / max(float(g.sum() + p.sum()), 1.0))
            scores.append(float(np.mean(dice)) if dice else 1.0)
        return {"dice": float(np.mean(scores)) if scores else 0.0, "n": len(scores)}

    return validate


def run_training(cfg: TrainConfig, data: str | Path, out: str | Path, *, resume: bool = False,
                 allow_config_change: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``data`` (train split), select on the val split, write the run to ``out``
    (``resume``: continue it from its newest checkpoint; the config and data must be the run's unless
    ``allow_config_change``).

    Started by torchrun (``WORLD_SIZE`` > 1), every process calls this: they join one process group for the
    call and train on the global batch ``optim.batch_size`` together (:mod:`imedsam.train.loop`); rank 0 writes
    the run. The result's ``rank`` says which process returned it."""
    from imedsam.train import distributed
    from imedsam.train.shards import per_rank_batch

    if distributed.launched():  # every process refuses at once, before waiting for the others
        per_rank_batch(cfg.optim.batch_size, distributed.env_world_size())
    with distributed.session(cfg.run.device) as dist:
        return _run_training(cfg, data, out, resume=resume, allow_config_change=allow_config_change, dist=dist)


def _run_training(cfg: TrainConfig, data: str | Path, out: str | Path, *, resume: bool, allow_config_change: bool,
                  dist: DistContext | None) -> TrainResult:
    from imedsam.data import SegmentationDataset, discover
    from imedsam.data.cases import dataset_cases
    from imedsam.models.registry import build_system, get_system
    from imedsam.runtime import autocast_dtype, resolve_device
    from imedsam.train.checkpoint import latest_checkpoint
    from imedsam.train.distributed import on_main
    from imedsam.train.init_weights import load_init_weights, read_init_source
    from imedsam.train.loop import precheck_run
    from imedsam.train.objectives import get_objective

    on_main(dist, lambda: precheck_run(out, resume))
    init = None
    if cfg.run.init_from is not None and not (resume and latest_checkpoint(Path(out)) is not None):
        init = read_init_source(cfg.run.init_from, cfg.model.system)  # checked before the data is read
    spec = get_system(cfg.model.system)
    objective_cls = get_objective(spec.objective, spec.name)
    depth = getattr(cfg.model, "stack_depth", 1)
    if cfg.run.val_stack_stride > depth:  # before the data is read
        raise ImedsamError(f"run.val_stack_stride: {cfg.run.val_stack_stride} must be at most the model's stack "
                           f"depth {depth} (a larger stride leaves slices in no stack)")
    index = discover(data)
    if not index.has_splits:
        raise ImedsamError(f"--data: {data} has no splits (splits.json, nnU-Net imagesTr/imagesTs or SAM-Med2D's "
                           "JSON files); add a splits.json with train/val/test lists of file stems")
    if cfg.data.val_split not in index.counts():
        index = hold_out_val(index, cfg.data.val_fraction, cfg.run.seed, cfg.data.train_split, cfg.data.val_split)
    train_set = training_dataset(cfg, index, objective_cls)
    val_cases = []
    stacks = getattr(objective_cls, "items", None) == "stacks"
    val_refs = [c for c in index if c.split == cfg.data.val_split] if stacks else []
    if cfg.data.val_split in index.counts() and not stacks:
        val_set = SegmentationDataset(index, split=cfg.data.val_split, min_foreground=cfg.data.min_foreground)
        val_cases = dataset_cases(val_set)
    elif not val_refs:
        log.warning("no %r split: the last checkpoint is kept, none is selected", cfg.data.val_split)
    if cfg.model.img_size is None:  # the encoder runs at the training grid; saved so inference rebuilds it
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"img_size": cfg.data.image_size})})
    seed_everything(cfg.run.seed)  # the adapters' and decoder's random initialisation is seeded too
    system = build_system(config=cfg.model)
    if init is not None:  # resuming, the checkpoint holds the weights
        load_init_weights(system, init)
    device = resolve_device(cfg.run.device) if dist is None else dist.device
    amp = autocast_dtype(device, cfg.run.precision)
    size_val = tuple(cfg.run.val_size) if cfg.run.val_size else None
    validate = make_validator(val_cases, system.val_protocols, size=size_val, device=device, amp=amp,
                              seed=cfg.run.seed) if val_cases else None
    if val_refs:
        validate = make_volume_validator(val_refs, device=device, amp=amp, stride=cfg.run.val_stack_stride)
    return train(system, objective_cls, train_set, validate, cfg, Path(out), resume=resume, data=data,
                 allow_config_change=allow_config_change, dist=dist)
