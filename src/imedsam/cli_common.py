"""Pieces shared by the command-line verbs: output checks, display windows, model options."""

from __future__ import annotations

import argparse
from pathlib import Path

from imedsam.errors import ImedsamError


def parse_window(text: str | None):
    """``--window``: a CT window name (soft_tissue, lung, bone, brain) or ``CENTER,WIDTH`` -> what
    :func:`imedsam.io.windowing.resolve_window` takes; None stays None."""
    if text is None:
        return None
    if "," in text:
        try:
            center, width = (float(v) for v in text.split(","))
        except ValueError:
            raise ImedsamError(f"--window: expected CENTER,WIDTH or a name, got {text!r}") from None
        return (center, width)
    return text


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Refuse an output that is an input or another output, or that cannot be written, before any work."""
    from imedsam.io.atomic import check_writable

    seen: dict[Path, str] = {Path(v).resolve(): k for k, v in inputs.items() if v}
    for arg, value in outputs.items():
        if not value:
            continue
        path = Path(value).resolve()
        if path in seen:
            what = "the input" if seen[path] in inputs else seen[path]
            raise ImedsamError(f"{arg}: {value} is also {what} ({seen[path]}); choose another output file, "
                               "inputs are never overwritten")
        seen[path] = arg
        check_writable(path, arg)


def model_options(args: argparse.Namespace) -> dict:
    """``build_system`` options given on the command line (``--backbone``, ``--preprocess``)."""
    options = {}
    if getattr(args, "backbone", None):
        options["backbone"] = args.backbone
    if getattr(args, "preprocess", None):
        options["preprocess"] = args.preprocess
    return options


def system_class_for(args: argparse.Namespace, model: str | None):
    """The class of the system a verb will run (its capabilities), without building it: the model of
    ``--model``/``--adapter``, or with ``--runtime onnx`` the one recorded in ``--onnx-dir``'s manifest."""
    if getattr(args, "runtime", "torch") == "onnx":
        from imedsam.infer.onnx_manifest import read_manifest
        from imedsam.infer.onnx_runtime import onnx_system_class

        if args.onnx_dir is None:
            raise ImedsamError("--runtime onnx: give the exported folder with --onnx-dir DIR")
        return onnx_system_class(read_manifest(args.onnx_dir)[1], args.onnx_dir)
    from imedsam.models.registry import system_class

    return system_class(model, adapter=args.adapter)


def build_segmenter(args: argparse.Namespace, model: str | None):
    """The :class:`~imedsam.infer.segmenter.Segmenter` the model options of a verb ask for (``--adaptive`` set;
    ``--runtime onnx``: the export in ``--onnx-dir``, with ``--model`` only if given)."""
    from imedsam.infer.segmenter import Segmenter

    runtime = getattr(args, "runtime", "torch")
    if runtime == "onnx":
        model = args.model  # not the litemedsam default: the export names its model
        if getattr(args, "adaptive", False):
            raise ImedsamError("--adaptive: not available with --runtime onnx (the exported implicit decoder "
                               "evaluates every pixel); drop --adaptive")
    seg = Segmenter(model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                    precision=args.precision, tta=args.tta, runtime=runtime,
                    onnx_dir=getattr(args, "onnx_dir", None), **model_options(args))
    if getattr(args, "adaptive", False):
        from imedsam.models.imedsam import set_adaptive_decoding

        set_adaptive_decoding(seg.system)
    return seg
