"""MA-SAM on the LA MRI volumes, side by side with zero-shot LiteMedSAM and I-MedSAM, per volume in 3-D (JSON lines).

Data: ``../shared/data/la-mri`` (nnU-Net raw layout, left atrium, LGE-MRI, 0.625 mm isotropic, arrays (88, H, W)).
Training on the 12 ``imagesTr`` volumes, one of them held out to validate on (``data.val_fraction`` 0.1, seeded by
``--seed``); scoring on the 8 ``imagesTs`` volumes. One intensity mapping per volume, the same in training and
scoring (``dataset.json`` names the channel LGE-MRI: the volume's 0.5-99.5 percentiles, ``imedsam.io.images``).

Methods (one JSON line per method and per method x volume; every line carries its protocol and the CPU facts):

* ``ma_sam_auto``: MA-SAM on LiteMedSAM's TinyViT, prompt-free, ``configs/ma-sam-la.yaml`` trained within
  ``--budget-minutes`` of wall clock (``optim.max_minutes``: it stops by itself after the step that spends it,
  then validates; the checkpoint best on the held-out volume is scored). Sliding stacks of 5 slices, the
  probabilities of every stack holding a slice averaged, argmax (``imedsam evaluate --volumes --prompt auto``).
* ``ma_sam_auto_lcc``: the same predictions with each class's largest 3-D connected component kept (the
  post-processing UA-MT and MC-Net use on the left atrium).
* ``ma_sam_auto_lcc_tta``: the same run with flip test-time augmentation (``--tta h,v``: every stack also
  predicted flipped left-right and up-down, logits flipped back and averaged; 3 passes), largest component kept.
* ``ma_sam_triplanar``: the prompt-free MA-SAM trained like ``ma_sam_auto`` (same config, budget and seed) but
  with stacks across all three axes of the isotropic volumes (``model.stack_axes=[k,j,i]``: each training stack
  runs across k, j or i; validated with ``run.val_stack_stride=5``), and scored with the probabilities of the
  three axes' sliding stacks averaged (tri-planar; each axis one pass). ``ma_sam_triplanar_lcc``: the same with
  the largest component kept; ``ma_sam_triplanar_k_lcc``: the same run across k only (``--stack-axes k``), what
  the averaging over the axes adds. Scoring costs about 4.8x ``ma_sam_auto`` (the volumes are 88 slices across k,
  ~140 across j, ~200 across i): ``--stack-stride 5`` brings it to the cost of one axis at stride 1.
* ``ma_sam_box3d``: MA-SAM's box-prompted variant (``model.decoder.prompt=box``): by default fine-tuned from the
  ``ma_sam_auto`` run (``run.init_from``: the same tensors; trained first if it is not) within
  ``--box3d-minutes`` (default 45; ``--box3d-init scratch``: from LiteMedSAM like the first, give it 90), every
  stack centred in the scan's 3-D box range and given the box's in-plane extent, expanded by up to 10 % per
  side; scored with one 3-D box per scan: the ground truth's tight box, its slices predicted from sliding stacks,
  the others background (``--prompt box3d``).
* ``ma_sam_box3d_lcc``, ``ma_sam_box3d_lcc_tta``: the same run with each class's largest 3-D connected component
  kept, and with flip test-time augmentation too (``--tta h,v``, the box flipped with each view).
* ``litemedsam_box``: zero-shot LiteMedSAM, slice by slice, each slice with ground truth prompted by its tight box
  (``--prompt box``).
* ``litemedsam_propagate``: zero-shot LiteMedSAM from one box, the ground truth's on its middle slice, then each
  next slice prompted with the previous slice's predicted mask's box until it vanishes (``--prompt propagate``).
* ``imedsam_box``: I-MedSAM slice by slice from each slice's tight box, when a trained I-MedSAM LA run folder is
  given (``--imedsam-run DIR``).

Metrics (``imedsam.evaluate.volumes``): per volume in 3-D on the volume's own grid, Dice, HD95 in mm (MONAI: max of
the two directed 95th percentiles of the surface distances, from the spacing) and NSD at 1 mm; then the mean over
the volumes (HD95: over the volumes where it is defined, the others counted). Inference precision ``--precision``
(default auto: bf16 autocast where this CPU measured it faster).

``--totalseg``: a smoke run on ``../shared/data/totalseg-example`` (one 3 mm CT, 41 classes present, declared CT:
soft-tissue window): a short MA-SAM training and a multi-class evaluation on the same volume. Its labels are a
model's output and it trains and scores one volume: a pipeline check, never a figure.

``--quick``: a couple of volumes cropped to a slab of slices, a few training steps at 64 px: a smoke test of the
script (tests/test_benchmarks.py); its figures are meaningless and every line says so.

    python benchmarks/la_mri.py [--out runs/la_mri] [--budget-minutes 90] [--box3d-minutes 45]
                                [--box3d-init auto|scratch]
                                [--methods a,b] [--imedsam-run DIR] [--skip-train] [--totalseg] [--quick]
                                [--seed 2023] [--precision auto] [--stack-stride 1]

``--stack-stride N`` scores the MA-SAM methods with a stack centred on every N-th slice only (N times fewer
passes; ``imedsam evaluate --stack-stride``), as ``METHOD@strideN`` beside the stride-1 results.

A finished training is reused and an unfinished one resumed, so a second call adds what the first left out
(e.g. ``--methods ma_sam_box3d`` after a first call without it); ``la_results.json`` keeps every method's latest
result, ``results.jsonl`` every call's lines.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LA = DATA / "la-mri"
TOTALSEG = DATA / "totalseg-example"
CONFIG = ROOT / "configs" / "ma-sam-la.yaml"
LA_METHODS = ("ma_sam_auto", "ma_sam_auto_lcc", "ma_sam_auto_lcc_tta", "ma_sam_triplanar", "ma_sam_triplanar_lcc",
              "ma_sam_triplanar_k_lcc", "ma_sam_box3d", "ma_sam_box3d_lcc", "ma_sam_box3d_lcc_tta", "litemedsam_box",
              "litemedsam_propagate", "imedsam_box")
BOX3D_METHODS = {"ma_sam_box3d", "ma_sam_box3d_lcc", "ma_sam_box3d_lcc_tta"}  # one run: the box-prompted variant
TRIPLANAR_METHODS = {"ma_sam_triplanar", "ma_sam_triplanar_lcc", "ma_sam_triplanar_k_lcc"}  # one run
QUICK_NOTE = ("--quick: a smoke run (a few training steps at 64 px on volumes cropped to a slab of slices); the "
              "figures are meaningless")
METRICS = ("per volume in 3-D on its own grid: Dice; HD95 in mm (MONAI, max of the two directed 95th "
           "percentiles of the surface distances, from the spacing; undefined when one mask is empty: left out "
           "of the mean and counted); NSD at 1 mm tolerance; then the mean over the volumes")

# ----------------------------------------------------------------------------------------------- facts and rows


class Printer:
    """JSON lines on stdout (flushed), each with the run's common fields; also kept for ``results.jsonl``."""

    def __init__(self, common: dict) -> None:
        self.common = common
        self.lines: list[dict] = []

    def __call__(self, **fields) -> dict:
        line = {"benchmark": "la_mri", **fields, **self.common}
        self.lines.append(line)
        print(json.dumps(line, default=str), flush=True)
        return line


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(finite) / len(finite), 4) if finite else None


def per_volume(report: Path) -> list[dict]:
    """The report's rows (one per volume and class) averaged over the classes of each volume."""
    with open(report / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        entry = out.setdefault(r["volume"], {"dice": [], "hd95": [], "nsd": []})
        for key in entry:
            entry[key].append(_float(r[key]))
    return [{"volume": v, "classes": len(m["dice"]), "dice": _mean(m["dice"]), "hd95_mm": _mean(m["hd95"]),
             "nsd_1mm": _mean(m["nsd"])} for v, m in sorted(out.items())]


# ----------------------------------------------------------------------------------------------- data folders


def _copy_dataset_json(src: Path, dst: Path, **extra) -> None:
    info = json.loads((src / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**info, **extra}, indent=1))


def quick_dataset(src: Path, dst: Path, *, n_train: int = 3, n_test: int = 2, slices: int = 8) -> Path:
    """A few of ``src``'s volumes cropped to ``slices`` slices around their labelled middle (geometry kept), in
    the nnU-Net layout, with the same ``dataset.json``."""
    import nibabel as nib
    import numpy as np

    if (dst / "dataset.json").is_file():
        return dst
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        (dst / f"images{split}").mkdir(parents=True, exist_ok=True)
        (dst / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for label in sorted((src / f"labels{split}").glob("*.nii.gz"))[:n]:
            case = label.name[: -len(".nii.gz")]
            lab = nib.load(str(label))
            on = np.nonzero(np.asarray(lab.dataobj).any(axis=(0, 1)))[0]  # slices (k) holding a label
            mid = int(on[len(on) // 2]) if on.size else lab.shape[2] // 2
            k0 = max(0, min(mid - slices // 2, lab.shape[2] - slices))
            image = nib.load(str(src / f"images{split}" / f"{case}_0000.nii.gz"))
            nib.save(image.slicer[:, :, k0:k0 + slices], str(dst / f"images{split}" / f"{case}_0000.nii.gz"))
            nib.save(lab.slicer[:, :, k0:k0 + slices], str(dst / f"labels{split}" / f"{case}.nii.gz"))
    _copy_dataset_json(src, dst, numTraining=n_train, note=QUICK_NOTE)
    return dst


def totalseg_dataset(dst: Path) -> tuple[Path, int]:
    """``ct.nii.gz`` + ``ct_seg.nii.gz`` as a one-case nnU-Net dataset declared CT, its TotalSegmentator label ids
    renumbered 1..K in increasing order (``dataset.json`` keeps the original ids in the names). Returns the
    folder and K."""
    import nibabel as nib
    import numpy as np

    seg = nib.load(str(TOTALSEG / "ct_seg.nii.gz"))
    ids = np.asarray(seg.dataobj)
    present = [int(v) for v in np.unique(ids) if v > 0]
    if not (dst / "dataset.json").is_file():
        (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
        (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(TOTALSEG / "ct.nii.gz", dst / "imagesTr" / "ct_000_0000.nii.gz")
        lut = np.zeros(int(ids.max()) + 1, np.uint8)
        lut[present] = np.arange(1, len(present) + 1)
        nib.save(nib.Nifti1Image(lut[ids], seg.affine, seg.header), str(dst / "labelsTr" / "ct_000.nii.gz"))
        labels = {"background": 0, **{f"totalseg_{v}": k for k, v in enumerate(present, 1)}}
        (dst / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                      "numTraining": 1, "file_ending": ".nii.gz"}, indent=1))
    return dst, len(present)


# ----------------------------------------------------------------------------------------------- train, score


def _finished(cfg, state: dict) -> bool:
    o = cfg.optim
    return (int(state["epoch"]) + 1 >= o.epochs or (o.max_steps is not None and int(state["step"]) >= o.max_steps)
            or (o.max_minutes is not None and float(state.get("train_seconds", 0.0)) >= 60 * o.max_minutes))


def train_run(overrides: list[str], data: Path, out: Path, *, skip_train: bool) -> dict:
    """Train ``configs/ma-sam-la.yaml`` (with ``overrides``) into ``out``, resume an unfinished run, or reuse a
    finished one; ``skip_train``: reuse only. Returns what the run did ("skipped" when there is nothing to score)."""
    import torch

    from imedsam.train import checkpoint as ckpt
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    cfg = load_config(CONFIG, overrides)
    latest = ckpt.latest_checkpoint(out)
    state = None if latest is None else torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    if skip_train or (state is not None and _finished(cfg, state)):
        if state is None:
            return {"skipped": f"--skip-train: no finished run in {out}"}
        history = json.loads(state["history"])
        return {"run": str(out), "reused": True, "steps": int(state["step"]), "best_val_dice": state["best"],
                "train_minutes": round(float(state.get("train_seconds", math.nan)) / 60, 1),
                "stopped": history[-1].get("stopped") if history else None}
    start = time.perf_counter()
    result = run_training(cfg, data, out, resume=ckpt.has_run(out))
    last = result.history[-1] if result.history else {}
    return {"run": str(out), "reused": False, "train_minutes": round((time.perf_counter() - start) / 60, 1),
            "steps": last.get("step"), "epochs": result.epochs_done, "best_val_dice": result.best_score,
            "stopped": last.get("stopped"), "image_size": cfg.data.image_size,
            "budget_minutes": cfg.optim.max_minutes}


def score(name: str, data: Path, out: Path, *, prompt: str, split: str, precision: str, seed: int,
          run: Path | None = None, model: str | None = None, largest_component: bool = False,
          tta: str | None = None, stack_stride: int = 1,
          stack_axes: tuple[str, ...] | None = None) -> tuple[dict, list[dict]]:
    """``imedsam evaluate --volumes`` of one method (report in ``out``): its summary and its per-volume rows."""
    from imedsam.evaluate.volumes import run_volume_evaluation

    start = time.perf_counter()
    summary = run_volume_evaluation(run=None if run is None else str(run), model=model, checkpoint=None, data=data,
                                    split=split, out=out, prompt=prompt, precision=precision, seed=seed,
                                    nsd_tolerance=1.0, largest_component=largest_component, tta=tta,
                                    stack_stride=stack_stride, stack_axes=stack_axes)
    volumes = per_volume(out)
    hd = [v["hd95_mm"] for v in volumes]
    return ({"method": name, "volumes": len(volumes), "dice": _mean([v["dice"] for v in volumes]),
             "hd95_mm": _mean([h for h in hd if h is not None]), "hd95_undefined": sum(h is None for h in hd),
             "nsd_1mm": _mean([v["nsd_1mm"] for v in volumes]), "report": summary["report"],
             "eval_seconds": round(time.perf_counter() - start, 1)}, volumes)


def protocol(*, prompt: str, resolution: str, precision: str, training: str, split: str, intensity: str) -> dict:
    return {"split": split, "training": training, "prompt": prompt, "metrics": METRICS, "resolution": resolution,
            "precision": precision, "intensity": intensity}


def _precision_name(precision: str) -> str:
    """``--precision`` and what it resolves to on this CPU, e.g. ``auto (bf16)``."""
    import torch

    from imedsam.runtime import autocast_dtype, resolve_device

    dtype = autocast_dtype(resolve_device("cpu"), precision)
    chosen = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return chosen if chosen == precision else f"{precision} ({chosen})"


def _intensity(data: Path) -> str:
    from imedsam import io
    from imedsam.data import discover
    from imedsam.io.images import intensity_rule

    return intensity_rule(io.read(discover(data).cases[0].image_path))


# ----------------------------------------------------------------------------------------------------- main


def _budget(info: dict, minutes: float) -> str:
    """How a scored run was trained: this call's budget, or what a reused run's own record says."""
    if info.get("reused"):
        return f"a finished run reused: {info.get('steps')} steps, {info.get('train_minutes')} min of training"
    return f"budget {minutes:g} min wall clock"


def la_rows(args, emit: Printer, data: Path, out: Path) -> None:
    """Train MA-SAM (budgeted), score every method on the test volumes, one line per method and volume."""
    from imedsam.data import discover
    from imedsam.train.api import hold_out_val
    from imedsam.train.config import load_config

    quick = ["data.image_size=64", "optim.max_steps=2", "optim.batch_size=1", "optim.warmup_steps=0"]
    base = load_config(CONFIG, []).optim

    def budget(minutes: float, max_steps: int | None = None) -> list[str]:
        """The wall-clock budget, and the cosine schedule's length scaled with it (the config's steps are what
        its own budget holds), so that a shorter run still decays its learning rate."""
        if args.quick:
            return [f"optim.max_minutes={minutes:g}"]
        steps = max_steps or max(10, round(base.max_steps * minutes / base.max_minutes))
        return [f"optim.max_minutes={minutes:g}", f"optim.max_steps={steps}"]

    overrides = [*budget(args.budget_minutes, args.max_steps), f"run.seed={args.seed}", *(quick if args.quick else [])]
    cfg = load_config(CONFIG, overrides)
    size = cfg.data.image_size
    d = cfg.data
    held = [c.case_id for c in hold_out_val(discover(data), d.val_fraction, args.seed, d.train_split, d.val_split)
            if c.split == d.val_split]  # as run_training holds them out
    trained = (f"imagesTr ({'cropped' if args.quick else '12'} volumes), {', '.join(held)} held out to validate "
               f"(data.val_fraction {d.val_fraction:g}, seed {args.seed})")
    native = "predicted and scored on each volume's own grid (0.625 mm)"
    common = protocol(prompt="", resolution=f"each slice's longest side resized to 256, padded; {native}",
                      precision=_precision_name(args.precision), training="none (zero-shot)",
                      split=f"test: the {'cropped ' if args.quick else ''}imagesTs volumes", intensity=_intensity(data))
    wanted = set(args.methods.split(","))
    run = out / "la_ma_sam_auto"
    info = {"skipped": "not in --methods"}
    from_auto = bool(wanted & BOX3D_METHODS) and args.box3d_init == "auto" and args.box3d_minutes > 0
    if wanted & {"ma_sam_auto", "ma_sam_auto_lcc", "ma_sam_auto_lcc_tta"} or from_auto:
        info = train_run(overrides, data, run, skip_train=args.skip_train)
        emit(row="train", method="ma_sam_auto", config=str(CONFIG.relative_to(ROOT)), overrides=overrides, **info)
    tri_run = out / "la_ma_sam_triplanar"
    tri_overrides = [*overrides, "model.stack_axes=[k,j,i]", "run.val_stack_stride=5"]
    if wanted & TRIPLANAR_METHODS:
        tri_info = train_run(tri_overrides, data, tri_run, skip_train=args.skip_train)
        emit(row="train", method="ma_sam_triplanar", config=str(CONFIG.relative_to(ROOT)), overrides=tri_overrides,
             **tri_info)
    else:
        tri_info = {"skipped": "not in --methods"}
    box_run = out / "la_ma_sam_box3d"
    box_overrides = [*budget(args.box3d_minutes), f"run.seed={args.seed}", *(quick if args.quick else []),
                     "model.decoder.prompt=box", *([f"run.init_from={run}"] if from_auto else [])]
    if not wanted & BOX3D_METHODS:
        box_info = {"skipped": "not in --methods"}
    elif args.box3d_minutes > 0:
        box_info = train_run(box_overrides, data, box_run, skip_train=args.skip_train)
        emit(row="train", method="ma_sam_box3d", config=str(CONFIG.relative_to(ROOT)), overrides=box_overrides,
             **box_info)
    else:
        box_info = {"skipped": "--box3d-minutes 0: the box-prompted variant was not trained"}
    box_start = (f", fine-tuned from the ma_sam_auto run ({_budget(info, args.budget_minutes)}; run.init_from)"
                 if from_auto else ", from LiteMedSAM's weights")
    resized = f"each slice resized to {size}x{size} (aspect not kept), probabilities resized back; {native}"
    lcc = "each class's largest 3-D connected component kept (26-connected)"
    flips = ("with flip test-time augmentation: every stack also predicted flipped left-right and up-down (any box "
             "flipped with it), the logits flipped back and averaged (3 passes)")
    auto_protocol = {**common, "training": f"{trained}; {_budget(info, args.budget_minutes)}", "resolution": resized}
    tri_protocol = {**common, "resolution": resized,
                    "training": f"{trained}; {_budget(tri_info, args.budget_minutes)}; each stack across one of the "
                                "three axes k, j, i (model.stack_axes; the volumes are isotropic), validated at "
                                "stack stride 5"}
    tri_prompt = ("none (automatic): sliding stacks of 5 slices across each of the axes k, j and i, each axis's "
                  "probabilities averaged per voxel over its stacks, then over the three axes, argmax")
    box_protocol = {
        **common, "training": f"{trained}; {_budget(box_info, args.box3d_minutes)}{box_start}; every stack given its "
                              "scan's 3-D box (in-plane extent, each side expanded by up to 10 %)",
        "resolution": resized}
    imedsam_run = Path(args.imedsam_run) if args.imedsam_run else None
    imedsam_skip = ("no --imedsam-run DIR given (a trained I-MedSAM LA run folder)" if imedsam_run is None else
                    None if imedsam_run.is_dir() else f"--imedsam-run {imedsam_run}: not a folder")
    # (name, evaluation arguments, reason it is not scored or None, protocol)
    methods = [
        ("ma_sam_auto", {"prompt": "auto", "run": run}, info.get("skipped"), {
            **auto_protocol,
            "prompt": "none (automatic): sliding stacks of 5 slices, probabilities averaged per slice, argmax"}),
        ("ma_sam_auto_lcc", {"prompt": "auto", "run": run, "largest_component": True}, info.get("skipped"), {
            **auto_protocol, "prompt": "none (automatic), as ma_sam_auto (the same run)",
            "post_processing": f"{lcc}, as UA-MT and MC-Net evaluate the left atrium"}),
        ("ma_sam_auto_lcc_tta", {"prompt": "auto", "run": run, "largest_component": True, "tta": "h,v"},
         info.get("skipped"), {
            **auto_protocol, "prompt": f"none (automatic), as ma_sam_auto (the same run), {flips}",
            "post_processing": lcc}),
        ("ma_sam_triplanar", {"prompt": "auto", "run": tri_run}, tri_info.get("skipped"),
         {**tri_protocol, "prompt": tri_prompt}),
        ("ma_sam_triplanar_lcc", {"prompt": "auto", "run": tri_run, "largest_component": True},
         tri_info.get("skipped"), {**tri_protocol, "prompt": tri_prompt, "post_processing": lcc}),
        ("ma_sam_triplanar_k_lcc", {"prompt": "auto", "run": tri_run, "largest_component": True,
                                    "stack_axes": ("k",)}, tri_info.get("skipped"), {
            **tri_protocol, "prompt": "none (automatic), the tri-planar run across k only (--stack-axes k): sliding "
                                      "stacks of 5 slices, probabilities averaged per slice, argmax",
            "post_processing": lcc}),
        ("ma_sam_box3d", {"prompt": "box3d", "run": box_run}, box_info.get("skipped"), {
            **box_protocol, "prompt": "one 3-D box per scan: the ground truth's tight box; its slices from sliding "
                                      "stacks of 5, probabilities averaged, argmax; the slices outside its range "
                                      "background"}),
        ("ma_sam_box3d_lcc", {"prompt": "box3d", "run": box_run, "largest_component": True},
         box_info.get("skipped"), {
            **box_protocol, "prompt": "one 3-D box per scan, as ma_sam_box3d (the same run)", "post_processing": lcc}),
        ("ma_sam_box3d_lcc_tta", {"prompt": "box3d", "run": box_run, "largest_component": True, "tta": "h,v"},
         box_info.get("skipped"), {
            **box_protocol, "prompt": f"one 3-D box per scan, as ma_sam_box3d (the same run), {flips}",
            "post_processing": lcc}),
        ("litemedsam_box", {"prompt": "box", "model": "litemedsam"}, None, {
            **common, "prompt": "each slice's tight ground-truth box (half-open), every slice with ground truth"}),
        ("litemedsam_propagate", {"prompt": "propagate", "model": "litemedsam"}, None, {
            **common, "prompt": "one box: the ground truth's on its middle slice, then each next slice the box of "
                                "the previous slice's predicted mask, until it vanishes"}),
        ("imedsam_box", {"prompt": "box", "run": imedsam_run}, imedsam_skip, {
            **common, "training": f"the run {imedsam_run}", "resolution": f"the run's encoder input; {native}",
            "prompt": "each slice's tight ground-truth box (half-open), every slice with ground truth"}),
    ]
    if args.quick:  # three axes of ~200 stacks each: a smoke run scores the tri-planar methods at stride 5
        methods = [(name, {**how, "stack_stride": 5}, skip, {**proto, "prompt": f"{proto['prompt']}; --quick: a "
                                                                              "stack on every 5th slice"})
                   if name in TRIPLANAR_METHODS else (name, how, skip, proto) for name, how, skip, proto in methods]
    stride = args.stack_stride
    if stride != 1:  # MA-SAM's stacks on every N-th slice: its own results, beside the stride-1 ones
        methods = [(f"{name}@stride{stride}", {**how, "stack_stride": stride}, skip,
                    {**proto, "prompt": f"{proto['prompt']}; a stack centred on every {stride}th slice only "
                                        f"(--stack-stride {stride}), each slice averaged over the stacks holding it"})
                   for name, how, skip, proto in methods if name.startswith("ma_sam")]
        wanted = {f"{name}@stride{stride}" for name in wanted}
    previous = out / "la_results.json"  # a call scoring some methods keeps the others' results
    results = json.loads(previous.read_text()) if previous.is_file() else {}
    for name, how, skip, proto in methods:
        if name not in wanted:
            continue
        if skip is not None:
            emit(row="method", method=name, skipped=skip, protocol=proto)
            continue
        try:
            summary, volumes = score(name, data, out / "reports" / name, split="test", precision=args.precision,
                                     seed=args.seed, **how)
        except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others
            emit(row="method", method=name, skipped=f"failed: {exc.__class__.__name__}: {exc}", protocol=proto)
            continue
        for v in volumes:
            emit(row="volume", method=name, **v, protocol=proto)
        results[name] = emit(row="method", **summary, per_volume_dice=[v["dice"] for v in volumes], protocol=proto)
    (out / "la_results.json").write_text(json.dumps(results, indent=1, default=str))


def totalseg_rows(args, emit: Printer, out: Path) -> None:
    """A short MA-SAM training and a multi-class evaluation on TotalSegmentator's example CT (a smoke test)."""
    data, classes = totalseg_dataset(out / "totalseg_data")
    steps = ["optim.max_steps=3", "data.image_size=64", "optim.batch_size=1"] if args.quick else [
        "optim.max_steps=100", "data.image_size=128"]
    overrides = [f"model.decoder.num_classes={classes}", "optim.epochs=200", "optim.warmup_steps=0",
                 f"optim.max_minutes={args.totalseg_minutes:g}", "data.val_fraction=0", f"run.seed={args.seed}",
                 *steps]
    info = train_run(overrides, data, out / "totalseg_ma_sam", skip_train=args.skip_train)
    note = ("smoke test only: the labels are TotalSegmentator's output, and the model is trained and scored on the "
            "same single CT volume; not a figure")
    emit(row="train", method="ma_sam_totalseg", overrides=overrides, note=note, **info)
    if "skipped" in info:
        return
    summary, _ = score("ma_sam_totalseg", data, out / "reports" / "totalseg", prompt="auto", split="train",
                       precision=args.precision, seed=args.seed, run=out / "totalseg_ma_sam")
    with open(out / "reports" / "totalseg" / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    dice = [_float(r["dice"]) for r in rows]
    emit(row="smoke", method="ma_sam_totalseg", dataset="totalseg-example", classes=len(rows),
         dice_mean_over_classes=_mean(dice), classes_dice_over_0_5=sum(d > 0.5 for d in dice if math.isfinite(d)),
         report=summary["report"], note=note, intensity=_intensity(data), precision=_precision_name(args.precision))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "la_mri"), help="run folders, reports, results")
    parser.add_argument("--budget-minutes", type=float, default=90.0,
                        help="wall-clock training budget of each MA-SAM training (optim.max_minutes)")
    parser.add_argument("--box3d-minutes", type=float, default=45.0,
                        help="wall-clock training budget of the box-prompted MA-SAM (0: not trained)")
    parser.add_argument("--box3d-init", default="auto", choices=("auto", "scratch"),
                        help="the box-prompted MA-SAM starts from the ma_sam_auto run's weights (auto, default) or "
                             "from LiteMedSAM's (scratch)")
    parser.add_argument("--methods", default=",".join(LA_METHODS),
                        help=f"comma-separated methods to train and score (default: all of {','.join(LA_METHODS)})")
    parser.add_argument("--imedsam-run", default=None, help="a trained I-MedSAM LA run folder to score")
    parser.add_argument("--skip-train", action="store_true", help="score the runs already in --out")
    parser.add_argument("--totalseg", action="store_true", help="also the TotalSegmentator example smoke run")
    parser.add_argument("--totalseg-minutes", type=float, default=3.0, help="its training budget")
    parser.add_argument("--quick", action="store_true", help=QUICK_NOTE)
    parser.add_argument("--stack-stride", type=int, default=1, metavar="N",
                        help="score the MA-SAM methods with a stack centred on every N-th slice (1-5; default 1, "
                             "every slice: MA-SAM's protocol), as METHOD@strideN")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="the cosine schedule's length of the automatic MA-SAM trainings (default: the "
                             "config's, scaled with --budget-minutes; its 1400 steps are what 90 min hold on an AMX "
                             "CPU: give what the budget holds on a slower one)")
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--precision", default="auto", help="inference precision (auto | fp32 | bf16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.budget_minutes <= 0 or args.totalseg_minutes <= 0 or args.box3d_minutes < 0:
        parser.error("--budget-minutes and --totalseg-minutes must be positive, --box3d-minutes >= 0")
    if not 1 <= args.stack_stride <= 5:
        parser.error(f"--stack-stride: {args.stack_stride} must be between 1 and the stack depth 5")
    unknown = set(args.methods.split(",")) - set(LA_METHODS)
    if unknown:
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LA_METHODS)}")
    if args.quick:
        args.budget_minutes = min(args.budget_minutes, 1.0)
        args.box3d_minutes = min(args.box3d_minutes, 1.0)
        args.totalseg_minutes = min(args.totalseg_minutes, 0.5)

    from imedsam.runtime import cpu_facts  # what --precision auto picks on this CPU and why

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"cpu": cpu_facts(), "seed": args.seed, **({"quick": True, "note": QUICK_NOTE} if args.quick else {})}
    emit = Printer(common)
    if not LA.is_dir():
        emit(row="method", method="all", skipped=f"{LA} not found")
    else:
        data = quick_dataset(LA, out / "la_quick_data") if args.quick else LA
        la_rows(args, emit, data, out)
    if args.totalseg:
        if TOTALSEG.is_dir():
            totalseg_rows(args, emit, out)
        else:
            emit(row="smoke", method="ma_sam_totalseg", skipped=f"{TOTALSEG} not found")
    with open(out / "results.jsonl", "a") as fh:  # every call's lines, appended
        fh.write("".join(json.dumps(line, default=str) + "\n" for line in emit.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
