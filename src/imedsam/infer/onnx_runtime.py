"""Run an ONNX export (``imedsam export --format onnx``) with onnxruntime behind the system interface.

:func:`load_onnx_system` returns a :class:`~imedsam.models.base.SegmentationSystem` whose ``encode`` and decoder
graphs run in onnxruntime while everything around them is the PyTorch system's own code: the classes below
subclass the exported system's class (:class:`~imedsam.models.sam.SamDecoding`,
:class:`~imedsam.models.sammed2d.SamMed2D`, :class:`~imedsam.models.imedsam.IMedSAM`) and replace only the
methods that run network weights. :class:`~imedsam.infer.segmenter.Segmenter` therefore checks prompts, maps
coordinates, chooses among SAM's masks, picks the implicit decoder's points to refine (top-k of the uncertainty),
restores logits to the image and post-processes exactly as with PyTorch; only the graphs' arithmetic differs
(float rounding, tests/export). Tensors cross the boundary as float32 on the CPU.

Prompts reach the graphs in SAM's ONNX layout (:mod:`imedsam.export.graphs`): the points, then the box's two
corners (labels 2, 3) or, without a box, SAM's padding point (label -1); the mask prompt with ``has_mask_input``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imedsam.decoders.coords import grid_coords
from imedsam.decoders.implicit_config import ImplicitDecoderConfig, ImplicitOutput, decode_chunk
from imedsam.decoders.ugs import select_topk
from imedsam.errors import ImedsamError
from imedsam.infer.onnx_manifest import GraphFile, Manifest, read_manifest
from imedsam.models.base import Prompts, SegmentationSystem
from imedsam.models.imedsam import IMedSAM
from imedsam.models.sam import SamDecoding
from imedsam.models.sammed2d import SamMed2D
from imedsam.sam.model import Preprocess

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line error naming the extra."""
    try:
        import onnxruntime
    except ImportError:
        raise ImedsamError("--runtime onnx: onnxruntime is not installed; pip install 'imedsam[onnx]' (or use "
                           "--runtime torch)") from None
    return onnxruntime


class OnnxGraphs:
    """One onnxruntime session per graph of an export, checked against the manifest's inputs and outputs."""

    def __init__(self, folder: Path, manifest: Manifest, *, providers: list[str], threads: int | None = None) -> None:
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.sessions: dict[str, Any] = {}
        self.specs: dict[str, GraphFile] = dict(manifest.graphs)
        for name, spec in manifest.graphs.items():
            try:
                session = ort.InferenceSession(str(folder / spec.file), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types (corrupt or foreign file)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ImedsamError(f"--onnx-dir {folder}: onnxruntime cannot load {spec.file} ({first}); "
                                   "export again") from None
            got_in = [i.name for i in session.get_inputs()]
            got_out = [o.name for o in session.get_outputs()]
            if got_in != spec.input_names() or got_out != spec.output_names():
                raise ImedsamError(f"--onnx-dir {folder}: {spec.file} has inputs {got_in} and outputs {got_out}, "
                                   f"the manifest says {spec.input_names()} and {spec.output_names()}; export again")
            self.sessions[name] = session

    def __contains__(self, name: str) -> bool:
        return name in self.sessions

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of graph ``name``, in the manifest's order."""
        return self.sessions[name].run(None, feeds)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def sam_prompt_feeds(prompts: Prompts, index: int, mask_input_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Prompt set ``index`` of ``prompts`` (encoder-input pixels) in SAM's ONNX layout (module docstring)."""
    coords, labels = [], []
    if prompts.points is not None:
        coords.append(_numpy(prompts.points[index]).reshape(-1, 2))
        labels.append(_numpy(prompts.labels[index]).reshape(-1))
    if prompts.boxes is not None:
        coords.append(_numpy(prompts.boxes.reshape(-1, 4)[index]).reshape(2, 2))
        labels.append(np.array([2.0, 3.0], np.float32))
    elif prompts.points is not None:
        coords.append(np.zeros((1, 2), np.float32))
        labels.append(np.array([-1.0], np.float32))
    has_mask = prompts.mask_input is not None
    mask = (_numpy(prompts.mask_input[index:index + 1]) if has_mask
            else np.zeros((1, 1, *mask_input_size), np.float32))
    return {"point_coords": np.concatenate(coords or [np.zeros((0, 2), np.float32)])[None],
            "point_labels": np.concatenate(labels or [np.zeros((0,), np.float32)])[None],
            "mask_input": mask, "has_mask_input": np.array([1.0 if has_mask else 0.0], np.float32)}


@dataclass(frozen=True)
class PromptGeometry:
    """What the Segmenter reads off a system's prompt encoder (``mask_input_size``, ``image_embedding_size``)."""

    mask_input_size: tuple[int, int]
    image_embedding_size: tuple[int, int]


class OnnxBackend:
    """Mixin: the encoder and the graph plumbing of an ONNX system (put first in the bases)."""

    runtime = "onnx"

    def __init__(self, folder: Path, manifest: Manifest, graphs: OnnxGraphs, config) -> None:
        SegmentationSystem.__init__(self)  # type: ignore[arg-type]  # the system's own __init__ builds weights
        self.folder, self.manifest, self.graphs, self.config = folder, manifest, graphs, config
        pre = manifest.preprocess
        self.preprocess = Preprocess(img_size=pre.img_size, normalize=pre.normalize, pixel_mean=pre.pixel_mean,
                                     pixel_std=pre.pixel_std, resize_longest_side=pre.resize_longest_side,
                                     pad=pre.pad, pipeline=pre.pipeline)
        self.prompt_encoder = PromptGeometry(tuple(manifest.prompts.mask_input_size),
                                             tuple(manifest.prompts.embedding_size))
        self.name = manifest.model.name

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, h, w), one image per graph call."""
        s = self.preprocess.img_size
        needs_hw = "valid_hw" in self.graphs.specs["encoder"].input_names()
        out = []
        for image in images:
            feeds = {"image": _numpy(image[None])}
            if needs_hw:
                feeds["valid_hw"] = np.asarray(valid_hw if valid_hw is not None else (s, s), dtype=np.int64)
            out.append(torch.from_numpy(self.graphs.run("encoder", feeds)[0]))
        return torch.cat(out).to(images.device)

    def _prompt_graph(self, name: str, embeddings: torch.Tensor, prompts: Prompts) -> list[list[torch.Tensor]]:
        """Run a prompt graph once per prompt set (the batch of ``prompts``); outputs per set, as tensors."""
        sizes = [t.shape[0] for t in (prompts.points, prompts.boxes, prompts.mask_input) if t is not None]
        results = []
        for i in range(max(sizes or [1])):
            feeds = sam_prompt_feeds(prompts, i, self.prompt_encoder.mask_input_size)
            feeds["image_embeddings"] = _numpy(embeddings[i if embeddings.shape[0] > 1 else 0][None])
            results.append([torch.from_numpy(o) for o in self.graphs.run(name, feeds)])
        return results


class OnnxSamMasks(OnnxBackend):
    """SAM's mask decoder as the ``decoder`` graph (all mask tokens; the choice among them stays in Python)."""

    def sam_masks(self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        outs = self._prompt_graph("decoder", embeddings, prompts)
        masks = torch.cat([o[0] for o in outs]).to(embeddings.device)
        iou = torch.cat([o[1] for o in outs]).to(embeddings.device)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, keep], iou[:, keep]


class OnnxZeroShotSam(OnnxSamMasks, SamDecoding):
    """A SAM-family backbone used zero-shot, from its ONNX export."""


class OnnxSamMed2D(OnnxSamMasks, SamMed2D):
    """SAM-Med2D from its ONNX export."""


class OnnxImplicitDecoder:
    """:class:`~imedsam.decoders.implicit.ImplicitDecoder`'s call contract on the ``implicit_coarse`` and
    ``implicit_fine`` graphs: queries in chunks of ``config.chunk_size``, the top-k of the uncertainty
    (:func:`~imedsam.decoders.ugs.select_topk`, per class, points of exactly zero uncertainty skipped) refined by
    the fine graph. The MC-dropout masks were drawn at export from ``seed``; another seed is refused."""

    def __init__(self, graphs: OnnxGraphs, config: ImplicitDecoderConfig, refine: bool, seed: int | None,
                 mc_samples: int, topk_ratio: float) -> None:
        self.graphs = graphs
        self.config = config.model_copy(update={"adaptive": False})
        self.refine, self.seed, self.mc_samples, self.topk_ratio = refine, seed, mc_samples, topk_ratio

    def _chunks(self, name: str, features: np.ndarray, coords: torch.Tensor) -> list[torch.Tensor]:
        step = decode_chunk(self.config, torch.float32, torch.device("cpu"))  # onnxruntime's CPU graphs: fp32
        parts: list[list[np.ndarray]] = []
        for start in range(0, coords.shape[1], step):
            feeds = {"features": features, "coords": _numpy(coords[:, start:start + step])}
            parts.append(self.graphs.run(name, feeds))
        return [torch.from_numpy(np.concatenate([p[i] for p in parts], axis=-1)) for i in range(len(parts[0]))]

    def __call__(self, features: torch.Tensor, prompt_pe=None, size: tuple[int, int] | None = None,
                 coords: torch.Tensor | None = None, *, seed: int | None = None, generator=None, fast=None,
                 prior_logits=None) -> ImplicitOutput:
        """``features (1, Cf, h, w)`` and a grid ``size=(H, W)`` or ``coords (1, N, 2)`` -> ImplicitOutput, shapes
        (1, K, H, W) or (1, K, N) (``prompt_pe`` is inside the graphs)."""
        if self.refine and seed is not None and int(seed) != self.seed:
            raise ImedsamError(f"seed {seed}: this ONNX export drew its MC-dropout masks with seed {self.seed}; use "
                               f"seed {self.seed} or export again with --seed {seed}")
        if features.shape[0] != 1:
            raise ImedsamError(f"ImplicitDecoder (onnx): one image at a time, got a batch of {features.shape[0]}")
        pts = grid_coords(size[0], size[1]).unsqueeze(0) if size is not None else coords.float().cpu()
        feats = _numpy(features)
        first = self._chunks("implicit_coarse", feats, pts)
        coarse = first[0]
        uncertainty = selected = None
        fine = coarse.clone()
        if self.refine:
            uncertainty = first[1]
            n = pts.shape[1]
            selected = select_topk(uncertainty, int(n * self.topk_ratio), skip_zero=True)  # (1, K, N)
            for c in range(coarse.shape[1]):
                index = selected[0, c].nonzero().squeeze(1)
                if index.numel():
                    fine[0, c, index] = self._chunks("implicit_fine", feats, pts[:, index])[0][0, c]
        out = ImplicitOutput(coarse, fine, uncertainty, selected)
        if size is not None:
            shape = (1, coarse.shape[1], int(size[0]), int(size[1]))
            out = ImplicitOutput(*(t.reshape(shape) if t is not None else None
                                   for t in (out.coarse_logits, out.fine_logits, out.uncertainty, out.selected)))
        return out


class OnnxIMedSAM(OnnxBackend, IMedSAM):
    """I-MedSAM from its ONNX export: the ``trunk`` graph for ``_features``, :class:`OnnxImplicitDecoder` as
    ``decoder``; :meth:`IMedSAM.decode` (grids, padding, SAM prior, scores) runs unchanged."""

    def __init__(self, folder: Path, manifest: Manifest, graphs: OnnxGraphs, config) -> None:
        super().__init__(folder, manifest, graphs, config)
        info = manifest.implicit
        self.decoder = OnnxImplicitDecoder(graphs, config.decoder, info.refine, info.seed, info.mc_samples,
                                           info.topk_ratio)

    def _features(self, embeddings: torch.Tensor, prompts: Prompts):
        outs = self._prompt_graph("trunk", embeddings, prompts)
        features = torch.cat([o[0] for o in outs]).to(embeddings.device)
        prior = torch.cat([o[1] for o in outs]).to(embeddings.device) if len(outs[0]) > 1 else None
        return features, None, prior

    def decode(self, embeddings, prepared, prompts, *, multimask=False, size=None, uncertainty=False, seed=0):
        if uncertainty and not self.decoder.refine:
            raise ImedsamError(f"--uncertainty: the ONNX export in {self.folder} has the coarse decoder alone "
                               "(exported with --no-uncertainty); export again without it")
        return super().decode(embeddings, prepared, prompts, multimask=multimask, size=size,
                              uncertainty=uncertainty, seed=seed)


ONNX_CLASSES: dict[str, type[SegmentationSystem]] = {
    "sam": OnnxZeroShotSam, "sam_med2d": OnnxSamMed2D, "imedsam": OnnxIMedSAM}


def onnx_system_class(manifest: Manifest, folder: str | Path = "") -> type[SegmentationSystem]:
    """The runtime class of an export (its capabilities: ``prompt_types``, ``has_uncertainty``...)."""
    cls = ONNX_CLASSES.get(manifest.model.system)
    if cls is None:
        raise ImedsamError(f"--onnx-dir {folder}: system {manifest.model.system!r} has no ONNX runtime here; "
                           f"known: {', '.join(ONNX_CLASSES)}")
    return cls


def providers_for(device: str | torch.device) -> list[str]:
    """onnxruntime execution providers for ``--device`` (``auto``/``cpu``: CPU; ``cuda``: CUDA, then CPU)."""
    name = str(device).split(":")[0]
    if name in ("auto", "cpu"):
        return ["CPUExecutionProvider"]
    if name == "cuda":
        ort = require_onnxruntime()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ImedsamError("--device cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu) ; "
                               "use --device cpu with --runtime onnx")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ImedsamError(f"--device {device}: not available with --runtime onnx; use cpu or cuda")


def load_onnx_system(onnx_dir: str | Path | None, *, model: Any = None, checkpoint: Any = None, adapter: Any = None,
                     device: str | torch.device = "auto", precision: str = "auto", threads: int | None = None,
                     **model_options: Any) -> SegmentationSystem:
    """The system of the ONNX export in ``onnx_dir``, on onnxruntime (module docstring).

    ``model`` may repeat the exported model's name; weights options (``checkpoint``, ``adapter``, ``backbone``,
    ``preprocess``) are refused: the export holds its weights and input pipeline (manifest). The graphs run in
    float32 (``precision`` auto or fp32).
    """
    if onnx_dir is None:
        raise ImedsamError("--runtime onnx: give the exported folder with --onnx-dir DIR (imedsam export --format "
                           "onnx --out DIR)")
    require_onnxruntime()
    folder, manifest = read_manifest(onnx_dir)
    info = manifest.model
    if model is not None and not isinstance(model, str):
        raise ImedsamError("runtime='onnx': give the model as a name (or nothing), not a built system")
    if model is not None and model not in (info.name, info.system):
        raise ImedsamError(f"--model {model}: the ONNX export in {onnx_dir} is model {info.name!r}; drop --model or "
                           "give that name")
    given = {"--checkpoint": checkpoint, "--adapter": adapter, **{f"--{k}": v for k, v in model_options.items()}}
    given = [flag for flag, value in given.items() if value is not None]
    if given:
        raise ImedsamError(f"{given[0]}: the ONNX export in {onnx_dir} holds its weights and input pipeline ("
                           f"{info.name}{', adapter ' + info.adapter if info.adapter else ''}); drop {given[0]}")
    if precision not in ("auto", "fp32"):
        raise ImedsamError(f"--precision {precision}: the ONNX export runs in fp32; use --precision fp32 or auto")
    cls = onnx_system_class(manifest, onnx_dir)
    from imedsam.models.registry import validate_model_config

    config = validate_model_config(info.config, where=f"{onnx_dir} manifest model.config")
    graphs = OnnxGraphs(folder, manifest, providers=providers_for(device), threads=threads)
    needed = {"encoder", "trunk", "implicit_coarse"} if cls is OnnxIMedSAM else {"encoder", "decoder"}
    if manifest.implicit is not None and manifest.implicit.refine:
        needed.add("implicit_fine")
    missing = sorted(needed - set(manifest.graphs))
    if missing or (cls is OnnxIMedSAM and manifest.implicit is None):
        raise ImedsamError(f"--onnx-dir {onnx_dir}: the manifest lists no {(missing or ['implicit'])[0]} graph for "
                           f"system {info.system!r}; export again")
    system = cls(folder, manifest, graphs, config)
    log.info("onnx runtime: %s from %s (%s)", info.name, folder, ", ".join(manifest.graphs))
    return system


def load_onnx_runtime_system(runtime: str, onnx_dir: str | Path | None, **kwargs: Any) -> SegmentationSystem:
    """``Segmenter(runtime=..., onnx_dir=...)``: checks the pair, then :func:`load_onnx_system`."""
    if runtime not in RUNTIMES:
        raise ImedsamError(f"--runtime: unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        raise ImedsamError(f"--onnx-dir {onnx_dir}: an ONNX export runs with --runtime onnx (runtime='onnx')")
    return load_onnx_system(onnx_dir, **kwargs)
