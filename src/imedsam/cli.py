"""`imedsam <verb>`: thin command-line front end. Parses, builds a config, calls the library.

User errors (:class:`imedsam.errors.ImedsamError`) print one line ``imedsam: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # must precede the first torch import (see runtime.py)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from imedsam.cli_common import build_segmenter, check_outputs, parse_window, system_class_for  # noqa: E402
from imedsam.errors import ImedsamError  # noqa: E402

log = logging.getLogger("imedsam")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model name from `imedsam info` (default: litemedsam, or the model of --adapter)")
    p.add_argument("--checkpoint", default=None, help="base weights file (official SAM .pth, LiteMedSAM ...)")
    p.add_argument("--adapter", default=None, help="trained adapter weights (adapter.safetensors or a run folder)")
    p.add_argument("--backbone", default=None, help="backbone of an adapted model (e.g. litemedsam, sam_vit_b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (default: auto)")
    p.add_argument("--preprocess", default=None, choices=("imedsam", "official"),
                   help="input pipeline: imedsam (default) or official (MedSAM-lite's script bit for bit; "
                        "LiteMedSAM, needs opencv-python-headless)")


def _add_auto_args(p: argparse.ArgumentParser) -> None:
    from imedsam import cli_train

    p.add_argument("--points-per-side", type=cli_train.int_at_least(1), default=16,
                   help="--auto: point grid per side (default 16)")
    p.add_argument("--pred-iou-thresh", type=float, default=0.88, help="--auto: minimum predicted IoU (0.88)")
    p.add_argument("--stability-thresh", type=float, default=0.95, help="--auto: minimum stability score (0.95)")
    p.add_argument("--min-area", type=cli_train.int_at_least(0), default=0,
                   help="--auto: remove regions and holes under this many pixels (default 0)")


def _auto_settings(args: argparse.Namespace):
    from imedsam.infer.automatic import AutoSettings

    return AutoSettings(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                        stability_score_thresh=args.stability_thresh, min_region_area=args.min_area)


class _Parser(argparse.ArgumentParser):
    """Argument errors as every user error: one line ``imedsam: error: ...`` and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        verb = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        print(f"imedsam: error: {verb + ': ' if verb else ''}{message} (see imedsam {verb} --help)".replace(
            "  ", " "), file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imedsam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    from imedsam import cli_export, cli_train

    p = sub.add_parser("segment", help="segment a 2D image (PNG/JPG/TIF/BMP/DICOM slice) from a box, points, a "
                                       "previous mask, or automatically; or a volume (NIfTI, MHA/NRRD, DICOM "
                                       "series folder) slice by slice from a 3D box or points")
    p.add_argument("image", help="input image file, or a volume file or DICOM series folder")
    p.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box in original pixel coordinates (X1, Y1 one past the last pixel, as COCO/SAM boxes)")
    p.add_argument("--point", nargs="+", type=float, action="append", metavar="X Y [Z] LABEL",
                   help="a point in pixel coordinates with label 1 (foreground) or 0 (background): X Y LABEL on "
                        "an image, I J K LABEL (voxel indices) on a volume; repeatable")
    p.add_argument("--box3d", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                   help="volume: a 3D box in voxel indices along the file's first, second and third axes (as "
                        "nibabel and ITK-SNAP count them), half-open; every slice in its range is prompted")
    p.add_argument("--propagate", action="store_true",
                   help="volume: prompt one slice (middle of --box3d, or the first foreground --point) and follow "
                        "the mask slice by slice, each prompted with the previous mask's box, until it vanishes")
    p.add_argument("--axis", default="k", choices=("i", "j", "k"),
                   help="volume: slice across this file axis (default k, the third: axial for most CT/MR)")
    p.add_argument("--largest-component", action="store_true",
                   help="volume: keep each label's largest 3-D connected component (26-connected)")
    p.add_argument("--stack-stride", type=cli_train.int_at_least(1), default=1, metavar="N",
                   help="volume, stack models (MA-SAM): centre a stack on every N-th slice (default 1: on every "
                        "slice, MA-SAM's protocol); each slice then averages about D/N stacks instead of D: N "
                        "times faster")
    p.add_argument("--stack-axes", type=cli_train.stack_axes, default=None, metavar="AXES",
                   help="volume, " + cli_train.STACK_AXES_HELP)
    p.add_argument("--mask-input", default=None, metavar="PREV",
                   help="a previous mask of the image (PNG, non-zero = object) or low-res logits (.npy) as a "
                        "mask prompt, to refine it with --point")
    p.add_argument("--auto", action="store_true",
                   help="no prompt: every object, as an instance label map (0 background, 1..K) from a grid of "
                        "point prompts")
    _add_auto_args(p)
    p.add_argument("--out", required=True, help="output mask PNG (0/255; --auto: instance labels); for a volume "
                                                "a label volume (.nii.gz, .nii, .mha, .nrrd) on its grid")
    p.add_argument("--overlay", default=None, help="also write an overlay PNG of the mask on the image")
    p.add_argument("--size", nargs=2, type=cli_train.int_at_least(1), metavar=("H", "W"),
                   help="output grid (default: the original image size)")
    p.add_argument("--uncertainty", default=None,
                   help="write the per-pixel uncertainty map here (PNG, plus .npy beside it); implicit decoders")
    p.add_argument("--window", default=None,
                   help="display window for CT/MR: soft_tissue | lung | bone | brain | CENTER,WIDTH")
    p.add_argument("--multimask", action="store_true", help="let SAM propose 3 masks and keep the best-scored")
    _add_model_args(p)
    cli_export.add_runtime_args(p)
    cli_train.add_decoding_args(p)

    p = sub.add_parser("predict", help="segment every image and volume of a folder with one model loaded once "
                                       "(prompts from a JSON file, boxes from label maps, or automatic)")
    p.add_argument("-i", "--input", required=True, help="folder of images, volumes and DICOM series folders")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: one label map per case (NAME.png, NAME.nii.gz...) + predictions.csv")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", default=None, metavar="JSON",
                        help='per case: {"NAME": {"box": [x0, y0, x1, y1]} or a list of objects with box, points, '
                             'box3d, label, propagate} (README: Predict a folder)')
    source.add_argument("--boxes-from", default=None, metavar="LABELS_DIR",
                        help="label maps of the same names: each label value prompted with its tight box "
                             "(volumes: 3-D box) and written with that value")
    source.add_argument("--auto", action="store_true", help="2-D images: every object, instance labels 1..K")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists (default: skip them)")
    p.add_argument("--propagate", action="store_true",
                   help="--boxes-from on volumes: prompt each object's middle slice only and follow the mask")
    p.add_argument("--axis", default="k", choices=("i", "j", "k"), help="volumes: slice across this file axis")
    p.add_argument("--window", default=None, help="CT window name or CENTER,WIDTH (default: per file)")
    p.add_argument("--multimask", action="store_true", help="let SAM propose 3 masks and keep the best-scored")
    _add_auto_args(p)
    _add_model_args(p)
    cli_export.add_runtime_args(p)
    cli_train.add_decoding_args(p)

    p = sub.add_parser("info", help="models, weights found, device and versions")
    p.add_argument("--model", default=None, help="show the parameter breakdown of one model")
    p.add_argument("--backbone", default=None, help="backbone of an adapted model")
    p.add_argument("--mode", default=None, choices=("paper", "reference"), help="paper | reference (adapted models)")
    p.add_argument("--img-size", type=cli_train.int_at_least(16), default=None,
                   help="encoder input size (default: the system's, e.g. 384 for I-MedSAM on ViT, 256 SAM-Med2D)")
    p.add_argument("--num-classes", type=cli_train.int_at_least(1), default=None,
                   help="class heads of a multi-class system")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure fp32 against bf16 again for --precision auto, and ATen against oneDNN for fp32 "
                        "dense layers (on a quiet machine); the model parts' own measurements are dropped and "
                        "made again when each part is next used")

    p = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    p.add_argument("--data", default=None, help="use your own dataset folder instead of the embedded default")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--device", default="auto")

    cli_train.add_parsers(sub)
    cli_export.add_parsers(sub)
    from imedsam import cli_serve

    cli_serve.add_parsers(sub)
    return parser


def _read_mask_input(path: str):
    """A .npy array (low-res logits, or a mask of the image) as it is, or a mask image as bool (non-zero)."""
    import numpy as np

    from imedsam import io
    from imedsam.data.samples import normalize_mask

    if path.lower().endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImedsamError(f"--mask-input: cannot read {path} as a .npy array ({exc})") from None
    return normalize_mask(io.read(path).array, source=path, ndim=2) > 0


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from imedsam import io

    prompts = [name for name, given in (("--box", args.box), ("--point", args.point),
                                        ("--mask-input", args.mask_input), ("--box3d", args.box3d)) if given]
    if args.auto and prompts:
        raise ImedsamError(f"--auto: automatic mode takes no prompt; drop {', '.join(prompts)}")
    if not args.auto and not prompts:
        raise ImedsamError("no prompt given: pass --box X0 Y0 X1 Y1, --point X Y LABEL and/or --mask-input PREV, "
                           "or --auto (a volume: --box3d I0 J0 K0 I1 J1 K1 and/or --point I J K LABEL)")
    if args.point and any(len(p) not in (3, 4) for p in args.point):
        bad = next(p for p in args.point if len(p) not in (3, 4))
        raise ImedsamError(f"--point: expected X Y LABEL (an image) or I J K LABEL (a volume), got {bad}")
    sample = io.read(args.image)
    from imedsam.io.sample import require_finite

    require_finite(sample.array, args.image)
    if sample.is_volume:
        from imedsam.cli_volume import segment_volume_command

        return segment_volume_command(args, sample)
    volume_only = [flag for flag, given in (("--box3d", args.box3d), ("--propagate", args.propagate),
                                            ("--axis", args.axis != "k"),
                                            ("--largest-component", args.largest_component),
                                            ("--stack-stride", args.stack_stride != 1),
                                            ("--stack-axes", args.stack_axes)) if given]
    if volume_only:
        raise ImedsamError(f"{volume_only[0]}: {args.image} is a 2D image; {volume_only[0]} goes with a volume "
                           "(use --box X0 Y0 X1 Y1 / --point X Y LABEL)")
    points = labels = None
    if args.point:
        pts = np.asarray(args.point, dtype=np.float64) if all(len(p) == 3 for p in args.point) else None
        if pts is None:
            raise ImedsamError(f"--point: {args.image} is a 2D image: give X Y LABEL (3 values) per point")
        if not np.all(np.isin(pts[:, 2], (0, 1))):
            raise ImedsamError(f"--point: LABEL must be 1 (foreground) or 0 (background), got {pts[:, 2].tolist()}")
        points, labels = pts[:, :2], pts[:, 2].astype(np.int64)
    if args.size:
        from imedsam.runtime import check_output_grid

        check_output_grid(tuple(args.size), 3 if args.multimask else 1)
    check_outputs({"image": args.image, "--mask-input": args.mask_input},
                   {"--out": args.out, "--overlay": args.overlay, "--uncertainty": args.uncertainty})
    if args.uncertainty and not args.uncertainty.lower().endswith(".png"):
        raise ImedsamError(f"--uncertainty {args.uncertainty}: the map is written as PNG (+ .npy beside it); use a "
                           ".png file name")
    dicom_seg = args.out.lower().endswith(".dcm")
    if dicom_seg:
        from imedsam.io.dicom_seg import check_dicom_seg

        if args.size:
            raise ImedsamError(f"--out {args.out}: a DICOM-SEG lies on its source image's grid; drop --size or "
                               "write .png")
        check_dicom_seg(sample, f"--out {args.out}")
    elif not args.out.lower().endswith(".png"):
        raise ImedsamError(f"--out {args.out}: a 2D mask is written as .png (or .dcm: a DICOM-SEG of a DICOM input)")
    model = args.model or ("litemedsam" if args.adapter is None else None)
    cls = system_class_for(args, model)
    kinds = [k for k, given in (("box", args.box), ("points", args.point), ("mask", args.mask_input)) if given]
    if args.auto:
        kinds = ["points"]
    unusable = [k for k in kinds if k not in cls.prompt_types]
    if unusable:
        flag = {"box": "--box", "points": "--point" if not args.auto else "--auto", "mask": "--mask-input"}
        raise ImedsamError(f"{flag[unusable[0]]}: model {model or args.adapter!r} cannot use a {unusable[0]} prompt")
    if args.uncertainty and not cls.has_uncertainty:
        raise ImedsamError(f"--uncertainty: model {model!r} gives no uncertainty map; use --model imedsam")
    mask_input = _read_mask_input(args.mask_input) if args.mask_input else None
    # every prompt is checked against the image before the model is loaded and the image encoded
    from imedsam.sam.prepare import check_box, check_points

    hw = tuple(int(n) for n in sample.geometry.shape)
    if args.box is not None:
        check_box(args.box, hw)
    if points is not None:
        check_points(points, labels, hw)
    if mask_input is not None and not args.mask_input.lower().endswith(".npy") and tuple(mask_input.shape) != hw:
        raise ImedsamError(f"--mask-input {args.mask_input}: mask is {mask_input.shape[0]}x{mask_input.shape[1]} "
                           f"(HxW) but the image is {hw[0]}x{hw[1]}; give the mask of this image")
    rgb = io.to_display_rgb(sample, window=parse_window(args.window))
    seg = build_segmenter(args, model)
    seg.set_image(rgb)
    if args.auto:
        return _segment_auto(args, seg, rgb, sample)
    pred = seg.predict(box=args.box, points=points, point_labels=labels, mask_input=mask_input,
                       multimask=args.multimask, size=tuple(args.size) if args.size else None,
                       uncertainty=bool(args.uncertainty), min_component=args.min_component)
    best = int(np.argmax(pred.scores))
    mask = pred.masks[best]
    if dicom_seg:
        from imedsam.io.dicom_seg import source_headers, write_dicom_seg

        write_dicom_seg(args.out, mask.astype(np.uint8), source_headers(sample))
    else:
        io.write_mask(args.out, mask)
    written = {"mask": str(Path(args.out).resolve())}
    if args.overlay:
        from imedsam.io.images import resize_rgb

        io.write_overlay(args.overlay, resize_rgb(rgb, mask.shape), mask)
        written["overlay"] = str(Path(args.overlay).resolve())
    if args.uncertainty:
        from imedsam.io.images import write_uncertainty

        written.update(write_uncertainty(args.uncertainty, pred.uncertainty))
    print(json.dumps({"foreground_pixels": int(mask.sum()), "score": float(pred.scores[best]), **written}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imedsam.infer.folder import FolderSettings, list_cases, load_prompt_file, predict_folder

    src, out = Path(args.input).resolve(), Path(args.output).resolve()
    if out == src or src in out.parents:
        raise ImedsamError(f"-o {args.output}: inside the input folder {args.input}; write predictions elsewhere "
                           "(inputs are never overwritten)")
    if out.exists() and not out.is_dir():
        raise ImedsamError(f"-o {args.output}: is a file; give a folder")
    cases = list_cases(src)
    prompts = load_prompt_file(args.prompts) if args.prompts else None
    if args.boxes_from and not Path(args.boxes_from).is_dir():
        raise ImedsamError(f"--boxes-from {args.boxes_from}: not a folder of label maps")
    model = args.model or ("litemedsam" if args.adapter is None else None)
    cls = system_class_for(args, model)
    kinds = {"points"} if args.auto else {"box"} if args.boxes_from else {
        kind for objs in prompts.values() for o in objs
        for kind, given in (("box", o.box or o.box3d), ("points", o.points)) if given}
    unusable = sorted(k for k in kinds if k not in cls.prompt_types)
    if unusable:
        raise ImedsamError(f"--model: {model or args.adapter!r} cannot use a {unusable[0]} prompt")
    if prompts is not None:
        missing = [name for name, _ in cases if name not in prompts]
        if len(missing) == len(cases):
            raise ImedsamError(f"--prompts {args.prompts}: names none of the cases of {args.input} (e.g. "
                               f"{cases[0][0]!r}); keys are file names without suffix")
    seg = build_segmenter(args, model)
    settings = FolderSettings(window=parse_window(args.window), axis=args.axis, multimask=args.multimask,
                              min_component=args.min_component, overwrite=args.overwrite, propagate=args.propagate)
    summary = predict_folder(seg, src, out, prompts=prompts, boxes_from=args.boxes_from,
                             auto=_auto_settings(args) if args.auto else None, settings=settings)
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _segment_auto(args: argparse.Namespace, seg, rgb, sample) -> int:
    from imedsam import io
    from imedsam.infer.automatic import generate_masks, label_map

    masks = generate_masks(seg, _auto_settings(args))
    labels = label_map(masks, seg.original_size)
    if args.out.lower().endswith(".dcm"):
        from imedsam.io.dicom_seg import source_headers, write_dicom_seg

        write_dicom_seg(args.out, labels, source_headers(sample))
    else:
        io.write_mask(args.out, labels if labels.max() > 1 else labels.astype(bool))
    written = {"labels": str(Path(args.out).resolve())}
    if args.overlay:
        io.write_overlay(args.overlay, rgb, labels)
        written["overlay"] = str(Path(args.overlay).resolve())
    print(json.dumps({"objects": len(masks), "areas": [m.area for m in sorted(masks, key=lambda m: -m.area)],
                      "scores": [round(m.score, 4) for m in sorted(masks, key=lambda m: -m.area)], **written}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from imedsam.info import collect_info, format_info

    if args.model is None and (args.backbone or args.mode or args.img_size or args.num_classes):
        raise ImedsamError("--backbone/--mode/--img-size/--num-classes describe a model: add --model NAME")
    if args.recalibrate:
        from imedsam.runtime import cpu_precision, forget_part_precisions, fp32_linear_backend

        cpu_precision(refresh=True)
        forget_part_precisions()  # each model part is measured again when next used
        fp32_linear_backend(refresh=True)
    info = collect_info(model=args.model, backbone=args.backbone, mode=args.mode, img_size=args.img_size,
                        num_classes=args.num_classes)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imedsam.demo import run_demo

    run_demo(out=Path(args.out), data=Path(args.data) if args.data else None, device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, already printed in one line)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"segment": cmd_segment, "predict": cmd_predict, "info": cmd_info, "demo": cmd_demo}
    from imedsam import cli_train

    handlers.update(cli_train.HANDLERS)
    from imedsam import cli_export

    handlers.update(cli_export.HANDLERS)
    from imedsam import cli_serve

    handlers.update(cli_serve.HANDLERS)
    try:
        return handlers[args.verb](args)
    except ImedsamError as exc:
        print(f"imedsam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imedsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
