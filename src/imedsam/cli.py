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

from imedsam.errors import ImedsamError  # noqa: E402

log = logging.getLogger("imedsam")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam",
                   help="model name from `imedsam info` (default: litemedsam)")
    p.add_argument("--checkpoint", default=None, help="base weights file (official SAM .pth, LiteMedSAM ...)")
    p.add_argument("--adapter", default=None, help="trained adapter weights (adapter.safetensors or a run folder)")
    p.add_argument("--backbone", default=None, help="backbone of an adapted model (e.g. litemedsam, sam_vit_b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imedsam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    from imedsam import cli_train

    p = sub.add_parser("segment", help="segment a 2D image (PNG/JPG/TIF/BMP/DICOM slice) from a box and/or points")
    p.add_argument("image", help="input image file")
    p.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box in original pixel coordinates (X1, Y1 one past the last pixel, as COCO/SAM boxes)")
    p.add_argument("--point", nargs=3, type=float, action="append", metavar=("X", "Y", "LABEL"),
                   help="a point in pixel coordinates with label 1 (foreground) or 0 (background); repeatable")
    p.add_argument("--out", required=True, help="output mask PNG (0/255)")
    p.add_argument("--overlay", default=None, help="also write an overlay PNG of the mask on the image")
    p.add_argument("--size", nargs=2, type=cli_train.int_at_least(1), metavar=("H", "W"),
                   help="output grid (default: the original image size)")
    p.add_argument("--uncertainty", default=None,
                   help="write the per-pixel uncertainty map here (PNG, plus .npy beside it); implicit decoders")
    p.add_argument("--window", default=None,
                   help="display window for CT/MR: soft_tissue | lung | bone | brain | CENTER,WIDTH")
    p.add_argument("--multimask", action="store_true", help="let SAM propose 3 masks and keep the best-scored")
    _add_model_args(p)
    cli_train.add_decoding_args(p)

    p = sub.add_parser("info", help="models, weights found, device and versions")
    p.add_argument("--model", default=None, help="show the parameter breakdown of one model")
    p.add_argument("--backbone", default=None, help="backbone of an adapted model")
    p.add_argument("--mode", default=None, help="paper | reference (adapted models)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="the main job on the embedded default (see README)")
    p.add_argument("--data", default=None, help="use your own dataset folder instead of the embedded default")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--device", default="auto")

    cli_train.add_parsers(sub)
    return parser


def _parse_window(text: str | None):
    if text is None:
        return None
    if "," in text:
        try:
            center, width = (float(v) for v in text.split(","))
        except ValueError:
            raise ImedsamError(f"--window: expected CENTER,WIDTH or a name, got {text!r}") from None
        return (center, width)
    return text


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from imedsam import io
    from imedsam.infer.segmenter import Segmenter

    sample = io.read(args.image)
    if sample.is_volume:
        raise ImedsamError(f"{args.image}: is a volume; `segment` takes a 2D image (slice it first)")
    if args.box is None and not args.point:
        raise ImedsamError("no prompt given: pass --box X0 Y0 X1 Y1 and/or --point X Y LABEL")
    rgb = io.to_display_rgb(sample, window=_parse_window(args.window))
    options = {}
    if args.backbone:
        options["backbone"] = args.backbone
    seg = Segmenter(args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                    precision=args.precision, tta=args.tta, **options)
    if args.adaptive:
        from imedsam.models.imedsam import set_adaptive_decoding

        set_adaptive_decoding(seg.system)
    seg.set_image(rgb)
    points = labels = None
    if args.point:
        pts = np.asarray(args.point, dtype=np.float64)
        if not np.all(np.isin(pts[:, 2], (0, 1))):
            raise ImedsamError(f"--point: LABEL must be 1 (foreground) or 0 (background), got {pts[:, 2].tolist()}")
        points, labels = pts[:, :2], pts[:, 2].astype(np.int64)
    pred = seg.predict(box=args.box, points=points, point_labels=labels, multimask=args.multimask,
                       size=tuple(args.size) if args.size else None, uncertainty=bool(args.uncertainty),
                       min_component=args.min_component)
    best = int(np.argmax(pred.scores))
    mask = pred.masks[best]
    io.write_mask(args.out, mask)
    written = {"mask": str(Path(args.out).resolve())}
    if args.overlay:
        from imedsam.io.images import resize_rgb

        io.write_overlay(args.overlay, resize_rgb(rgb, mask.shape), mask)
        written["overlay"] = str(Path(args.overlay).resolve())
    if args.uncertainty:
        if pred.uncertainty is None:
            raise ImedsamError(f"--uncertainty: model {args.model!r} has no uncertainty output; use --model imedsam")
        from imedsam.io.images import write_uncertainty

        written.update(write_uncertainty(args.uncertainty, pred.uncertainty))
    print(json.dumps({"foreground_pixels": int(mask.sum()), "score": float(pred.scores[best]), **written}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from imedsam.info import collect_info, format_info

    info = collect_info(model=args.model, backbone=args.backbone, mode=args.mode)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imedsam.demo import run_demo

    run_demo(out=Path(args.out), data=Path(args.data) if args.data else None, device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"segment": cmd_segment, "info": cmd_info, "demo": cmd_demo}
    from imedsam import cli_train

    handlers.update(cli_train.HANDLERS)
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
