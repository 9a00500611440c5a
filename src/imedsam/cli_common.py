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


def build_segmenter(args: argparse.Namespace, model: str | None):
    """The :class:`~imedsam.infer.segmenter.Segmenter` the model options of a verb ask for (``--adaptive`` set)."""
    from imedsam.infer.segmenter import Segmenter

    seg = Segmenter(model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                    precision=args.precision, tta=args.tta, **model_options(args))
    if getattr(args, "adaptive", False):
        from imedsam.models.imedsam import set_adaptive_decoding

        set_adaptive_decoding(seg.system)
    return seg
