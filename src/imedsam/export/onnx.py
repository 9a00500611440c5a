"""Export a system to a folder of ONNX graphs plus ``manifest.json`` (:mod:`imedsam.infer.onnx_manifest`).

What is exported (graphs: :mod:`imedsam.export.graphs`):

* every system: the image encoder, with LoRA folded into its base weights and the frequency image as DFT matrix
  products (:mod:`imedsam.export.merge`);
* SAM's mask decoder (zero-shot backbones, SAM-Med2D): prompt encoder + mask decoder, any number of points;
* I-MedSAM: the decoder trunk (prompt encoder, two-way transformer, up-scaling, SAM prior) and the implicit
  decoder as two query graphs, coarse (+ MC-dropout uncertainty, its dropout masks drawn from ``seed``) and fine;
  the top-k choice of the points to refine between them runs in the runtime's Python, as in PyTorch. With
  ``uncertainty=False`` only the coarse decoder is exported (no refinement: not the PyTorch prediction).

Not exported: prompt-free systems over slice stacks (MA-SAM: 3-D adapters across adjacent slices, sliding-stack
volume inference in Python); I-MedSAM's adaptive grid decoding (an inference-time approximation of the same
decoder; the runtime evaluates every pixel) and ``mode: reference`` refinement (it refines arbitrary tied points,
systems.md F.1: exportable with ``uncertainty=False`` only). Pre- and post-processing (resize, normalisation, pad,
prompt mapping, logits restored to the image) stay in Python, shared with the PyTorch path.

The graphs are traced with PyTorch's TorchScript exporter (``dynamo=False``, opset 17; "legacy" since PyTorch 2.9
made the dynamo exporter the default, still shipped in 2.13): it needs no onnxscript, takes the dynamic axes as
they are, and every op used here has a symbolic except ``torch.fft`` (rewritten). The folder is written beside its
target and moved into place when complete, so a reader sees the whole export or none of it.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import imedsam
from imedsam.errors import ImedsamError
from imedsam.export.graphs import (
    EncoderGraph,
    FrequencyEncoderGraph,
    ImplicitCoarseGraph,
    ImplicitFineGraph,
    ImplicitTrunkGraph,
    SamDecoderGraph,
)
from imedsam.export.merge import export_encoder
from imedsam.infer.onnx_manifest import (
    MANIFEST,
    POINT_LABELS,
    GraphFile,
    ImplicitInfo,
    Manifest,
    ModelInfo,
    PreprocessInfo,
    PromptInfo,
    TensorSpec,
)
from imedsam.io.atomic import atomic_write, sha256_file
from imedsam.models.base import SegmentationSystem

log = logging.getLogger(__name__)

OPSET = 17
PROMPT_FRAME = ("point_coords (x, y) in pixels of the S x S encoder input (the image resized so that its longest "
                "side is S, padded bottom/right); the graph adds 0.5 (pixel centre)")


@dataclass(frozen=True)
class ExportOptions:
    """``uncertainty``: export I-MedSAM's MC-dropout uncertainty and fine decoder (else the coarse decoder alone);
    ``seed``: seed of the MC-dropout masks (the runtime refuses another); ``check``: run every graph once in
    onnxruntime against PyTorch and record the largest difference in the manifest."""

    uncertainty: bool = True
    seed: int = 0
    check: bool = True


def require_onnx() -> None:
    """The ``onnx`` package (the exporter writes through it); a one-line error naming the extra when absent."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImedsamError("export --format onnx: the onnx package is not installed; "
                           "pip install 'imedsam[onnx]' (onnx, onnxruntime)") from None


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a target that is a file, a non-empty folder (unless ``overwrite``, and then only
    an earlier export: a folder with ``manifest.json``, never any folder) or whose parent cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ImedsamError(f"--out {out}: is a file; give a folder for the ONNX export")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ImedsamError(f"--out {out}: folder exists and is not empty; pass --overwrite to replace it or "
                               "choose a new folder")
        if not (path / MANIFEST).is_file():
            raise ImedsamError(f"--out {out}: not an earlier ONNX export (no {MANIFEST}); --overwrite replaces "
                               "only those: choose a new or empty folder")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImedsamError(f"--out {out}: {parent} is not writable; choose a folder in a writable place")
    return path


def check_exportable(cls: type[SegmentationSystem]) -> None:
    """Refuse, before building it, a system whose inference cannot be exported (see the module docstring)."""
    from imedsam.models.imedsam import IMedSAM
    from imedsam.models.sam import SamDecoding

    if cls.prompt_free or cls.stack_depth != 1 or not issubclass(cls, (SamDecoding, IMedSAM)):
        raise ImedsamError(f"export --format onnx: model {cls.name!r} cannot be exported: its inference runs over "
                           "stacks of adjacent slices (3-D adapters, sliding-stack volumes) in Python; export a "
                           "promptable 2-D system (a SAM backbone, sam_med2d, imedsam)")


def _spec(name: str, tensor: torch.Tensor, dynamic: dict[int, str] | None = None) -> TensorSpec:
    shape: list[int | str] = list(tensor.shape)
    for axis, label in (dynamic or {}).items():
        shape[axis] = label
    return TensorSpec(name=name, shape=shape, dtype="int64" if tensor.dtype == torch.int64 else "float32")


class _Writer:
    """Traces graphs into a staging folder, recording each file's inputs and outputs (and the check)."""

    def __init__(self, folder: Path, check: bool) -> None:
        self.folder = folder
        self.check = check
        self.graphs: dict[str, GraphFile] = {}
        self.differences: dict[str, float] = {}

    def add(self, name: str, module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
            dynamic: dict[str, dict[int, str]] | None = None) -> tuple[torch.Tensor, ...]:
        """Trace ``module`` on ``inputs`` into ``<name>.onnx``; returns its PyTorch outputs on them."""
        dynamic = dynamic or {}
        module = module.eval()
        args = tuple(inputs.values())
        with torch.no_grad():
            expected = module(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        file = f"{name}.onnx"

        def write(path: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, the exporter's deprecation
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                                  input_names=list(inputs), output_names=outputs, dynamic_axes=dynamic,
                                  do_constant_folding=True)

        path = atomic_write(self.folder / file, write)
        self.graphs[name] = GraphFile(
            file=file, bytes=path.stat().st_size, sha256=sha256_file(path),
            inputs=[_spec(k, v, dynamic.get(k)) for k, v in inputs.items()],
            outputs=[_spec(k, v, dynamic.get(k)) for k, v in zip(outputs, expected)])
        difference = _max_difference(path, inputs, expected) if self.check else None
        if difference is not None:
            self.differences[name] = difference
        log.info("exported %s (%.1f MB)", file, path.stat().st_size / 1e6)
        return expected


def _max_difference(path: Path, inputs: dict[str, torch.Tensor],
                    expected: tuple[torch.Tensor, ...]) -> float | None:
    """Largest |PyTorch - onnxruntime| over a graph's outputs on the tracing inputs (None without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    return float(max(np.abs(g - e.float().numpy()).max() if g.size else 0.0 for g, e in zip(got, expected)))


def _prompt_inputs(embedding: torch.Tensor, mask_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Tracing inputs of the prompt graphs: 3 points (a dynamic axis; 1 would be specialised away)."""
    gen = torch.Generator().manual_seed(0)
    return {"image_embeddings": embedding,
            "point_coords": torch.rand(1, 3, 2, generator=gen) * 10,
            "point_labels": torch.tensor([[1.0, 0.0, -1.0]]),
            "mask_input": torch.randn(1, 1, *mask_size, generator=gen),
            "has_mask_input": torch.ones(1)}


PROMPT_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
QUERY_AXES = {"coords": {1: "num_queries"}}


def export_onnx(system: SegmentationSystem, out: str | Path, *, model: ModelInfo,
                options: ExportOptions = ExportOptions(), overwrite: bool = False) -> Manifest:
    """Write ``system``'s ONNX export to the folder ``out`` (module docstring); returns its manifest.

    ``model`` names what was exported (model name, system, config, adapter). ``out`` is checked first
    (:func:`check_out_dir`); the folder appears complete or not at all. ``system`` is put in eval mode and
    float32; its encoder is copied before LoRA is merged, so it is otherwise left as it is.
    """
    require_onnx()
    check_exportable(type(system))
    target = check_out_dir(out, overwrite)
    system = system.float().eval()
    staging = target.resolve().parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        manifest = _export_into(system, staging, model, options)
        atomic_write(staging / MANIFEST, lambda p: p.write_text(manifest.to_json()))
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _move_into_place(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.resolve().parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(system: SegmentationSystem, folder: Path, model: ModelInfo, options: ExportOptions) -> Manifest:
    from imedsam.models.imedsam import IMedSAM

    pre = system.preprocess
    s = pre.img_size
    prompt_encoder = system.prompt_encoder
    writer = _Writer(folder, options.check)
    not_exported: list[str] = []

    encoder = export_encoder(system.sam.image_encoder if hasattr(system, "sam") else system.image_encoder)
    image = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    if encoder.needs_valid_hw:  # a padded example: the region is an input, not a constant
        valid = torch.tensor([s, max(1, (3 * s) // 4)], dtype=torch.int64)
        image[..., valid[1]:] = 0
        (embedding,) = writer.add("encoder", FrequencyEncoderGraph(encoder.module),
                                  {"image": image, "valid_hw": valid}, ["image_embeddings"])
    else:
        (embedding,) = writer.add("encoder", EncoderGraph(encoder.module), {"image": image}, ["image_embeddings"])
    prompts = _prompt_inputs(embedding.float(), tuple(prompt_encoder.mask_input_size))

    implicit = None
    if isinstance(system, IMedSAM):
        implicit = _export_implicit(system, writer, prompts, options, not_exported)
    else:
        writer.add("decoder", SamDecoderGraph(prompt_encoder, system.mask_decoder), prompts,
                   ["low_res_masks", "iou_predictions"], PROMPT_AXES)
    return Manifest(
        model=model,
        preprocess=PreprocessInfo(img_size=s, normalize=pre.normalize, pixel_mean=pre.pixel_mean,
                                  pixel_std=pre.pixel_std, resize_longest_side=pre.resize_longest_side, pad=pre.pad,
                                  pipeline=pre.pipeline),
        prompts=PromptInfo(frame=PROMPT_FRAME, labels=POINT_LABELS,
                           embedding_size=tuple(prompt_encoder.image_embedding_size),
                           mask_input_size=tuple(prompt_encoder.mask_input_size)),
        graphs=writer.graphs, implicit=implicit, merged=encoder.merged, rewritten=encoder.rewritten,
        not_exported=not_exported, check=writer.differences,
        versions=_versions(), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _export_implicit(system, writer: _Writer, prompts: dict[str, torch.Tensor], options: ExportOptions,
                     not_exported: list[str]) -> ImplicitInfo:
    decoder = system.decoder
    cfg = decoder.config
    if cfg.corner_aligned_encoding:
        raise ImedsamError("export --format onnx: decoder.corner_aligned_encoding (the official code's grid, for "
                           "comparisons) is not exported; export a model trained without it")
    refine = options.uncertainty and decoder.refinement_enabled
    if options.uncertainty and decoder.refinement_enabled and decoder.mode != "paper":
        raise ImedsamError("export --format onnx: mode reference refines arbitrary tied points at inference (no "
                           "MC dropout, systems.md F.1), which no other runtime reproduces; export with "
                           "--no-uncertainty (coarse decoder alone)")
    trunk = ImplicitTrunkGraph(system.prompt_encoder, system.mask_decoder, system.config.decoder.sam_prior)
    outputs = ["features", "sam_prior"] if trunk.sam_prior else ["features"]
    features = writer.add("trunk", trunk, prompts, outputs, PROMPT_AXES)[0]
    coords = torch.rand(1, 7, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pe = system.prompt_encoder.get_dense_pe()
    masks = decoder._mc_masks(1, torch.device("cpu"), options.seed, None) if refine else None
    queries = {"features": features, "coords": coords}
    writer.add("implicit_coarse", ImplicitCoarseGraph(decoder, pe, masks), queries,
               ["coarse_logits", "uncertainty"] if refine else ["coarse_logits"], QUERY_AXES)
    if refine:
        writer.add("implicit_fine", ImplicitFineGraph(decoder, pe), queries, ["fine_logits"], QUERY_AXES)
    elif decoder.refinement_enabled:
        not_exported.append("implicit decoder refinement (--no-uncertainty): the coarse decoder alone answers; "
                            "no uncertainty map")
    not_exported.append("adaptive grid decoding: the runtime evaluates every pixel of the grid")
    return ImplicitInfo(refine=refine, seed=options.seed if refine else None, mc_samples=decoder.mc_samples,
                        topk_ratio=cfg.topk_ratio)


def _versions() -> dict[str, str]:
    import onnx

    return {"imedsam": imedsam.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "opset": str(OPSET)}


def model_info(system: SegmentationSystem, name: str, adapter: str | Path | None) -> ModelInfo:
    """What the manifest says was exported: the model name given, the system, its config and adapter file."""
    from imedsam.models.registry import resolve_adapter_file

    adapter_file = None if adapter is None else resolve_adapter_file(adapter).resolve()
    return ModelInfo(name=name, system=system.config.system, config=system.config.model_dump(mode="json"),
                     adapter=None if adapter_file is None else str(adapter_file),
                     adapter_sha256=None if adapter_file is None else sha256_file(adapter_file))


__all__ = ["ExportOptions", "check_exportable", "check_out_dir", "export_onnx", "model_info", "require_onnx"]
