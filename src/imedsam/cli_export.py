"""`imedsam export --format onnx`, and the ``--runtime onnx --onnx-dir DIR`` options of `segment` and `predict`
(``pip install 'imedsam[onnx]'``; README: Export to ONNX)."""

from __future__ import annotations

import argparse
import json

from imedsam.errors import ImedsamError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model (and a trained --adapter RUN) to a folder of ONNX graphs + "
                                      "manifest.json, for --runtime onnx or other ONNX runtimes")
    p.add_argument("--format", required=True, choices=("onnx",), help="export format (onnx)")
    p.add_argument("--model", default=None,
                   help="model name from `imedsam info` (default: litemedsam, or the model of --adapter)")
    p.add_argument("--checkpoint", default=None, help="base weights file (official SAM .pth, LiteMedSAM ...)")
    p.add_argument("--adapter", default=None, metavar="RUN",
                   help="trained adapter weights (a run folder or adapter.safetensors); LoRA is merged into the "
                        "encoder's weights")
    p.add_argument("--backbone", default=None, help="backbone of an adapted model (e.g. litemedsam, sam_vit_b)")
    p.add_argument("--preprocess", default=None, choices=("imedsam", "official"),
                   help="input pipeline recorded in the manifest: imedsam (default) or official (LiteMedSAM)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-uncertainty", action="store_true",
                   help="I-MedSAM: export the coarse implicit decoder alone (no MC-dropout uncertainty, no "
                        "refinement: faster, not the PyTorch prediction)")
    p.add_argument("--seed", type=int, default=0,
                   help="I-MedSAM: seed of the MC-dropout masks stored in the export (default 0, the Segmenter's)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """``--runtime`` and ``--onnx-dir`` of the verbs that predict."""
    p.add_argument("--runtime", default="torch", choices=("torch", "onnx"),
                   help="torch (default) or onnx: run the export in --onnx-dir with onnxruntime (fp32)")
    p.add_argument("--onnx-dir", default=None, metavar="DIR", help="an `imedsam export --format onnx` folder")


def cmd_export(args: argparse.Namespace) -> int:
    from imedsam.cli_common import model_options
    from imedsam.export.onnx import (
        ExportOptions,
        check_exportable,
        check_out_dir,
        export_onnx,
        model_info,
        require_onnx,
    )
    from imedsam.models.imedsam import IMedSAM
    from imedsam.models.registry import build_system, system_class

    require_onnx()
    check_out_dir(args.out, args.overwrite)
    model = args.model or ("litemedsam" if args.adapter is None else None)
    cls = system_class(model, adapter=args.adapter)
    check_exportable(cls)
    if args.no_uncertainty and not issubclass(cls, IMedSAM):
        raise ImedsamError(f"--no-uncertainty: model {model or args.adapter!r} has no implicit decoder; drop it")
    system = build_system(model, checkpoint=args.checkpoint, adapter=args.adapter, **model_options(args))
    name = model or system.config.system
    manifest = export_onnx(system, args.out, model=model_info(system, name, args.adapter),
                           options=ExportOptions(uncertainty=not args.no_uncertainty, seed=args.seed),
                           overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "model": name, "files": {k: g.file for k, g in manifest.graphs.items()},
                      "max_abs_diff": manifest.check, "merged": manifest.merged, "rewritten": manifest.rewritten,
                      "not_exported": manifest.not_exported}))
    return 0


HANDLERS = {"export": cmd_export}
