"""CLI verbs `train` and `evaluate` (kept apart from cli.py so that module stays small)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from imedsam.errors import ImedsamError

log = logging.getLogger("imedsam")


def int_at_least(minimum: int):
    """An argparse ``type`` for whole numbers >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text}")
        return value

    return parse


def stack_axes(text: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``--stack-axes``: comma-separated distinct file axes among k, j, i."""
    from imedsam.io.slicing import check_axes

    try:
        return check_axes(tuple(t.strip() for t in text.split(",") if t.strip()))
    except ImedsamError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


STACK_AXES_HELP = ("stack models (MA-SAM): the file axes the stacks run across, comma-separated (default the "
                   "model's own: k, or k,j,i for a tri-planar run); the probabilities are averaged over the axes, "
                   "each axis one more pass")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """Options on how a prediction is decoded and cleaned, shared by `segment` and `evaluate`."""
    p.add_argument("--min-component", type=int_at_least(0), default=0, metavar="N",
                   help="remove predicted components smaller than N output pixels (default 0: none)")
    p.add_argument("--adaptive", action="store_true",
                   help="implicit decoder: decode large output grids exactly only near the boundary (faster; "
                        "approximate)")
    p.add_argument("--tta", default="none", metavar="FLIPS",
                   help="flip test-time augmentation: 'none' (default) or flips among h, v, hv, e.g. h,v (the "
                        "logits of the image and its flipped copies averaged; one encoder pass per view)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (see configs/); default: built-in defaults")
    p.add_argument("--data", required=True, help="dataset folder with splits (splits.json or nnU-Net layout)")
    p.add_argument("--out", required=True,
                   help="run folder (config.yaml, checkpoints/, adapter.safetensors, best.safetensors)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint (same config and data)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue with a changed config or data (not exact; both configs are kept)")
    p.add_argument("--device", default=None, help="override run.device (auto | cpu | cuda | mps)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from the trained weights of RUN (a run folder or adapter file of the same system), "
                        "e.g. fine-tune a variant: sets run.init_from")
    p.add_argument("--nproc", type=int_at_least(1), default=None, metavar="N",
                   help="train in N processes on this machine (one per GPU; gloo on CPU), as torchrun "
                        "--nproc-per-node N would; optim.batch_size stays the global batch (divisible by N)")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. optim.epochs=5")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="adapt a model on a dataset folder (images/+masks/ or nnU-Net raw); several "
                                     "processes: --nproc N or torchrun -m imedsam train")
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="score a trained run or a zero-shot model on a dataset split")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="a training run folder")
    src.add_argument("--model", default=None, help="a zero-shot model name, e.g. litemedsam")
    p.add_argument("--checkpoint", default=None, help="base weights for --model")
    p.add_argument("--preprocess", default=None, choices=("imedsam", "official"),
                   help="input pipeline: imedsam (default, or the run's) or official (MedSAM-lite's script bit for "
                        "bit; LiteMedSAM, needs opencv-python-headless)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test",
                   help="split to score (default: test); 'all' scores every case (a folder without splits: all)")
    p.add_argument("--prompt", default="box", metavar="PROTOCOL",
                   help="box (default) | points:N (N random points from the ground truth, seeded; written to "
                        "prompts.json) | clicks:N (N corrective clicks at the largest error, Dice per click, NoC)")
    p.add_argument("--prompts", default=None, metavar="JSON",
                   help="points:N: reuse the points of this prompts.json (another model's report) instead of "
                        "drawing them")
    p.add_argument("--size", default="native", nargs="+",
                   help="output grid: 'native' (each image's own size) or H W")
    p.add_argument("--sweep", default=None, help="comma-separated square grids, e.g. 64,128,256,512,1024")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="score only the first N cases")
    p.add_argument("--min-foreground", type=int_at_least(1), default=1, metavar="PX",
                   help="score only objects (and volume slices) with at least PX pixels (default 1)")
    p.add_argument("--objects", default="classes", choices=("classes", "components"),
                   help="prompt targets: each class of an image (default) or each connected component")
    p.add_argument("--out", required=True, help="report folder (cases.csv, summary.json, report.html)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", help="fp32 (default) | auto | bf16 | fp16")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout passes and of --box-jitter")
    p.add_argument("--box-jitter", default=None, metavar="LO,HI",
                   help="expand each side of the GT box by a seeded U[LO, HI) pixels (default: the tight box)")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="TAU",
                   help="NSD tolerance, in mm where the spacing is known, else in pixels (default 2)")
    p.add_argument("--empty-policy", default="nan", metavar="POLICY",
                   help="HD/HD95 when exactly one of prediction and ground truth is empty: nan (excluded from "
                        "means, counted; default) | diagonal (of the grid) | a number")
    p.add_argument("--gt-dir", default=None,
                   help="score against the masks of the same names in this folder (e.g. the original-resolution "
                        "masks of a down-sampled dataset); 'native' is then each of these masks' grid")
    p.add_argument("--volumes", action="store_true",
                   help="3-D datasets: segment each volume slice by slice and score it per volume and class in 3-D "
                        "(mm from its spacing); --prompt box (each slice's GT box) | box3d | propagate | auto "
                        "(prompt-free models)")
    p.add_argument("--largest-component", action="store_true",
                   help="--volumes: keep each class's largest 3-D connected component before scoring (the usual "
                        "post-processing of single-structure benchmarks such as the left atrium)")
    p.add_argument("--axis", default="k", choices=("i", "j", "k"),
                   help="--volumes: slice across this file axis (default k, the third: axial for most CT/MR)")
    p.add_argument("--stack-stride", type=int_at_least(1), default=1, metavar="N",
                   help="--volumes --prompt auto|box3d, stack models (MA-SAM): centre a stack on every N-th slice "
                        "(default 1: every slice, MA-SAM's protocol); N times faster")
    p.add_argument("--stack-axes", type=stack_axes, default=None, metavar="AXES",
                   help="--volumes --prompt auto|box3d, " + STACK_AXES_HELP)
    p.add_argument("--window", default=None,
                   help="--volumes: intensity window (CT name or CENTER,WIDTH; default the file's, else the "
                        "volume's 0.5-99.5 percentiles)")
    add_decoding_args(p)


def _sizes(args) -> tuple[list, dict | None]:
    if args.sweep:
        try:
            grid = [int(v) for v in args.sweep.split(",")]
        except ValueError:
            raise ImedsamError(f"--sweep: expected comma-separated integers, got {args.sweep!r}") from None
        if min(grid) < 1:
            raise ImedsamError("--sweep: sizes must be positive")
        from imedsam.runtime import check_output_grid

        for g in grid:
            check_output_grid((g, g), argument="--sweep")
        return [(g, g) for g in grid], {}
    if args.size in ("native", ["native"]):
        return [None], None
    try:
        h, w = (int(v) for v in args.size)
    except ValueError:
        raise ImedsamError(f"--size: expected 'native' or H W, got {' '.join(args.size)}") from None
    if min(h, w) < 1:
        raise ImedsamError(f"--size: the output grid must be at least 1x1, got {h}x{w}")
    from imedsam.runtime import check_output_grid

    check_output_grid((h, w))
    return [(h, w)], None


def _empty_policy(text: str) -> str | float:
    if text in ("nan", "diagonal"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ImedsamError(f"--empty-policy: expected nan, diagonal or a number, got {text!r}") from None


def _box_jitter(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ImedsamError(f"--box-jitter: expected LO,HI in pixels (e.g. 0,10), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise ImedsamError(f"--box-jitter: need 0 <= LO <= HI, got {text!r}")
    return lo, hi


def cmd_train(args: argparse.Namespace) -> int:
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"run.device={args.device}")
    if args.init_from:
        overrides.append(f"run.init_from={args.init_from}")
    cfg = load_config(args.config, overrides)
    if args.allow_config_change and not args.resume:
        raise ImedsamError("--allow-config-change goes with --resume")
    if args.nproc is not None and args.nproc > 1:
        return _launch_processes(args, cfg)
    result = run_training(cfg, args.data, args.out, resume=args.resume,
                          allow_config_change=args.allow_config_change)
    if result.rank == 0:  # one line per run, from the main process
        print(json.dumps({"run": str(Path(result.run_dir).resolve()), "epochs": result.epochs_done,
                          "best_val_dice": result.best_score, "seconds": round(result.seconds, 1)}))
    return 0


def train_argv(args: argparse.Namespace) -> list[str]:
    """The ``imedsam`` arguments of this ``train`` command less ``--nproc`` (each process's command line),
    rebuilt from the parsed options so that abbreviations and ``--opt=value`` forms come out plain."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_args(parser)
    argv = (["-v"] if getattr(args, "verbose", False) else []) + ["train"]
    positional: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest)
        if action.dest == "nproc":
            continue
        if not action.option_strings:
            positional += list(value)
        elif action.nargs == 0:
            argv += [action.option_strings[-1]] if value else []
        elif value is not None and value != action.default:
            argv += [action.option_strings[-1], str(value)]
    return argv + positional


def _launch_processes(args: argparse.Namespace, cfg) -> int:
    """``--nproc N``: check what can be checked here, then start the N processes (:mod:`imedsam.train.launch`)."""
    from imedsam.train import distributed, launch
    from imedsam.train.loop import precheck_run
    from imedsam.train.shards import per_rank_batch

    if distributed.launched():
        raise ImedsamError(f"--nproc: this process is already one of {distributed.env_world_size()} started by "
                           "torchrun; drop --nproc")
    per_rank_batch(cfg.optim.batch_size, args.nproc)
    launch.check_processes(args.nproc, cfg.run.device)
    precheck_run(args.out, args.resume)
    return launch.launch(args.nproc, train_argv(args))


def _volume_only_flags(args: argparse.Namespace) -> None:
    """Options of the 2-D protocol that --volumes does not take (and the reverse), refused before any work."""
    if args.volumes:
        for flag, given in (("--prompts", args.prompts), ("--sweep", args.sweep), ("--gt-dir", args.gt_dir),
                            ("--box-jitter", args.box_jitter), ("--size", args.size not in ("native", ["native"])),
                            ("--objects", args.objects != "classes"), ("--adaptive", args.adaptive),
                            ("--min-component", args.min_component)):
            if given:
                raise ImedsamError(f"{flag}: not with --volumes (volumes are scored on their own grid, per class)")
    else:
        for flag, given in (("--axis", args.axis != "k"), ("--window", args.window),
                            ("--largest-component", args.largest_component),
                            ("--stack-stride", args.stack_stride != 1), ("--stack-axes", args.stack_axes)):
            if given:
                raise ImedsamError(f"{flag}: goes with --volumes (3-D scoring); 2-D evaluation slices volumes "
                                   "along their first array axis with one window per volume")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imedsam.evaluate.api import run_evaluation

    _volume_only_flags(args)
    if args.volumes:
        from imedsam.cli_common import parse_window
        from imedsam.evaluate.volumes import run_volume_evaluation

        summary = run_volume_evaluation(run=args.run, model=args.model, checkpoint=args.checkpoint, data=args.data,
                                        split=args.split, out=args.out, prompt=args.prompt, axis=args.axis,
                                        window=parse_window(args.window), device=args.device,
                                        precision=args.precision, seed=args.seed, limit=args.limit, tta=args.tta,
                                        min_foreground=args.min_foreground, nsd_tolerance=args.nsd_tolerance,
                                        empty_policy=_empty_policy(args.empty_policy), preprocess=args.preprocess,
                                        largest_component=args.largest_component,
                                        stack_stride=args.stack_stride, stack_axes=args.stack_axes)
        print(json.dumps(summary))
        return 0
    sizes, sweep = _sizes(args)
    summary = run_evaluation(run=args.run, model=args.model, checkpoint=args.checkpoint, data=args.data,
                             split=args.split, sizes=sizes, sweep=sweep is not None, out=args.out,
                             device=args.device, precision=args.precision, seed=args.seed, limit=args.limit,
                             adaptive=args.adaptive, min_component=args.min_component, tta=args.tta,
                             box_jitter=_box_jitter(args.box_jitter), gt_dir=args.gt_dir,
                             nsd_tolerance=args.nsd_tolerance, empty_policy=_empty_policy(args.empty_policy),
                             prompt=args.prompt, prompts_file=args.prompts, min_foreground=args.min_foreground,
                             objects=args.objects, preprocess=args.preprocess)
    print(json.dumps(summary))
    return 0


HANDLERS = {"train": cmd_train, "evaluate": cmd_evaluate}
