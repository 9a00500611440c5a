"""`Segmenter`: embed an image once, answer many prompts, on any output grid; interactive refinement.

Example::

    seg = Segmenter("litemedsam")
    seg.set_image(array)                      # (H, W) or (H, W, 3); computes the embedding once
    pred = seg.predict(box=(30, 40, 90, 100)) # prompts in ORIGINAL image pixel coordinates
    pred.masks                                # (K, H, W) bool on the original grid

    seg.refine(box=(30, 40, 90, 100))         # interaction: a box, then clicks where the mask is wrong
    seg.refine(point=(55, 70), label=0)       # background click: all clicks + previous logits as mask prompt
    seg.undo(); seg.reset()
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from imedsam.errors import ImedsamError
from imedsam.io.sample import Sample
from imedsam.models.base import SegmentationSystem
from imedsam.models.postprocess import remove_small_components
from imedsam.models.views import EncodedView, encode_views, mean_over_views, parse_tta
from imedsam.runtime import autocast, autocast_dtype, prepare_for_inference, resolve_device
from imedsam.sam.prepare import PreparedImage, check_box, check_points

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Masks for one prompt set.

    Attributes:
        masks: (K, H_o, W_o) bool, ``sigmoid(logits) > 0.5``.
        scores: (K,) predicted IoU (SAM decoders) or mean foreground confidence (implicit decoder).
        logits: (K, H_o, W_o) float32.
        low_res_logits: (K, h, w) float32 SAM low-res logits, reusable as ``mask_input``; None otherwise (and with
            test-time augmentation).
        uncertainty: (H_o, W_o) float32 per-pixel uncertainty, when asked for; else None.

    With flip test-time augmentation, logits, scores and uncertainty are the means over the views.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    low_res_logits: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


@dataclass(frozen=True)
class Interaction:
    """The prompts of one interaction state: the box, the clicks so far, and what they gave."""

    box: tuple[float, float, float, float] | None
    clicks: tuple[tuple[float, float, int], ...]
    prediction: Prediction


@dataclass(frozen=True)
class ImageState:
    """One image's embedding (one entry per test-time-augmentation view), as :meth:`Segmenter.image_state` gives.

    ``nbytes`` is what the embedding tensors hold, for caches bounded by memory."""

    views: tuple[EncodedView, ...]

    @property
    def nbytes(self) -> int:
        total = 0
        for v in self.views:
            emb = v.embedding
            tensors = emb if isinstance(emb, (list, tuple)) else (
                list(emb.values()) if isinstance(emb, dict) else [emb])
            total += sum(t.element_size() * t.nelement() for t in tensors if isinstance(t, torch.Tensor))
        return total


class Segmenter:
    """Caches one image embedding and decodes prompts onto any grid of that image.

    Args:
        model: a registry name (see ``imedsam info``), an already built :class:`SegmentationSystem`, or None: the
            model ``adapter`` was trained as (``litemedsam`` without an adapter).
        checkpoint: base weights for the backbone (official SAM ``.pth``, LiteMedSAM ...); default per model.
        adapter: trained adapter weights (``adapter.safetensors`` of a run, or its folder) for adapted systems.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: ``auto`` (bf16 autocast on CPUs where it measured faster, :func:`imedsam.runtime.cpu_precision`,
            and on CUDA), ``fp32``, ``bf16``, ``fp16``. A model built here from its name is frozen and keeps its
            Linear/Conv weights in that dtype (:func:`imedsam.runtime.prepare_for_inference`); a system passed in
            is left as it is. ``auto`` on a CPU that the machine calibration does not settle (bf16 native but not
            far ahead) chooses the encoder's and the decoder's precision apart, each from its own measured work
            (:mod:`imedsam.infer.part_precision`, cached per machine): ``encode_dtype`` and ``amp_dtype``.
        seed: seed of the Monte-Carlo dropout passes (uncertainty), so that repeated calls agree.
        tta: flip test-time augmentation (:mod:`imedsam.models.views`): ``None``/``"none"``, or flips among ``h``,
            ``v``, ``hv`` such as ``"h,v"``; each flip adds one encoder pass per image. Box and point prompts only.
        runtime: ``"torch"``, or ``"onnx"``: the export in ``onnx_dir`` (``imedsam export --format onnx``) run by
            onnxruntime in fp32 (:mod:`imedsam.infer.onnx_runtime`); it holds its weights, so ``checkpoint``,
            ``adapter`` and model options are refused, and ``model`` may only repeat its name.
    """

    def __init__(self, model: str | SegmentationSystem | None = None, *, checkpoint: str | None = None,
                 adapter: str | None = None, device: str = "auto", precision: str = "auto", seed: int = 0,
                 tta: str | None = None, runtime: str = "torch", onnx_dir: str | None = None,
                 **model_options) -> None:
        self.views = parse_tta(tta)
        if runtime != "torch" or onnx_dir is not None:
            from imedsam.infer.onnx_runtime import load_onnx_runtime_system

            model = load_onnx_runtime_system(runtime, onnx_dir, model=model, checkpoint=checkpoint, adapter=adapter,
                                             device=device, precision=precision, **model_options)
            device, precision = "cpu", "fp32"  # torch only maps prompts and restores logits around the graphs
        self.device = resolve_device(device)
        if model is None and adapter is None:
            model = "litemedsam"
        owned = model is None or isinstance(model, str)
        if owned:
            from imedsam.models.registry import build_system

            model = build_system(model, checkpoint=checkpoint, adapter=adapter, **model_options)
        self.amp_dtype = autocast_dtype(self.device, precision)  # the decoder's (prompts), and the default
        self.encode_dtype = self.amp_dtype  # the image encoder's
        if owned and precision == "auto" and self.device.type == "cpu" and runtime == "torch" \
                and model.stack_depth == 1:  # stack models run encoder and decoder together (predict_volume)
            from imedsam.infer.part_precision import auto_part_dtypes

            self.encode_dtype, self.amp_dtype = auto_part_dtypes(model, self.device)
        # a system built here is only used for inference; one passed in may still be trained elsewhere
        self.system = (prepare_for_inference(model, self.device, self.amp_dtype, part=model.encoder_module(),
                                             part_dtype=self.encode_dtype) if owned
                       else model.to(self.device).eval())
        self.seed = seed
        self._prepared: PreparedImage | None = None
        self._encoded: list[EncodedView] = []
        self._history: list[Interaction] = []

    @property
    def original_size(self) -> tuple[int, int]:
        self._require_image()
        return self._prepared.original_size

    def set_image(self, image: np.ndarray | Sample) -> None:
        """Compute and cache the embedding of a 2D image ((H, W) gray or (H, W, 3) RGB, display scale)."""
        if isinstance(image, Sample):
            from imedsam.io import to_display_rgb

            image = to_display_rgb(image)
        with torch.inference_mode(), autocast(self.device, self.encode_dtype):
            self._encoded = encode_views(self.system, np.asarray(image), self.views, self.device)
        if self.amp_dtype is None and self.encode_dtype is not None:  # a bf16 encoder, an fp32 decoder
            self._encoded = [replace(e, embedding=e.embedding.float()) for e in self._encoded]
        self._prepared = self._encoded[0].prepared
        self._history = []

    # ------------------------------------------------------------------------------------- shared models
    def fork(self) -> "Segmenter":
        """A Segmenter on the same model (weights shared, nothing copied) with its own image and interaction.

        Servers keep one model per process and one fork per user session; forks used from different threads
        must not share an image state object while one of them calls ``set_image``."""
        twin = copy.copy(self)
        twin._prepared, twin._encoded, twin._history = None, [], []
        return twin

    @property
    def image_state(self) -> ImageState:
        """The cached embedding of the current image (opaque; reusable with :meth:`set_image_state`)."""
        self._require_image()
        return ImageState(tuple(self._encoded))

    def set_image_state(self, state: ImageState, history: list[Interaction] | None = None) -> None:
        """Use an embedding computed earlier (by this Segmenter or a fork of it), with the interaction
        ``history`` (a :attr:`history` kept from an earlier call on the same image), or a fresh one."""
        self._encoded = list(state.views)
        self._prepared = self._encoded[0].prepared
        self._history = list(history or [])

    def predict(self, box=None, points=None, point_labels=None, mask_input=None, *, multimask: bool = False,
                size: tuple[int, int] | None = None, uncertainty: bool = False,
                min_component: int = 0) -> Prediction:
        """Decode prompts given in ORIGINAL image pixel coordinates.

        Args:
            box: (x0, y0, x1, y1).
            points: (N, 2) xy; ``point_labels``: (N,) 1 foreground / 0 background.
            mask_input: (h, w) or (1, h, w) low-res logits from a previous ``Prediction.low_res_logits``, or a
                mask of the original image's size (bool or 0/1), turned into such logits
                (:func:`imedsam.sam.prepare.mask_to_low_res`).
            multimask: return SAM's 3 candidate masks instead of 1.
            size: output grid (H_o, W_o); default the original image size.
            uncertainty: also return the per-pixel uncertainty map (implicit decoders only).
            min_component: drop 8-connected mask components smaller than this many output pixels (0: keep all;
                logits are left as decoded).
        """
        self._require_image()
        prepared = self._prepared
        if box is None and points is None and mask_input is None:
            raise ImedsamError("no prompt given: pass a box (--box X0 Y0 X1 Y1) and/or points (--point X Y LABEL)")
        kinds = [k for k, v in (("box", box), ("points", points), ("mask", mask_input)) if v is not None]
        self.system.check_prompts(kinds)
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise ImedsamError(f"--size: output grid must be at least 1x1, got {size[0]}x{size[1]}")
            from imedsam.runtime import check_output_grid

            check_output_grid(size, 3 if multimask else 1)
        if mask_input is not None and len(self._encoded) > 1:
            raise ImedsamError("mask_input: not supported with flip test-time augmentation (tta); "
                               "prompt with a box and/or points, or build the Segmenter without tta")
        if box is not None:
            box = check_box(box, prepared.original_size)
        if points is not None:
            if point_labels is None:
                point_labels = np.ones(len(np.asarray(points).reshape(-1, 2)), dtype=np.int64)
            points, point_labels = check_points(points, point_labels, prepared.original_size)
        outs = []
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            for encoded in self._encoded:
                prompts = encoded.prompts(box, points, point_labels)
                if mask_input is not None:  # one view only (checked above)
                    prompts.mask_input = self._mask_prompt(mask_input)
                out = self.system.decode(encoded.embedding, encoded.prepared, prompts, multimask=multimask,
                                         size=size, uncertainty=uncertainty, seed=self.seed)
                restore = encoded.view.restore
                outs.append((restore(out.logits[0].float()), out.scores[0].float(),
                             None if out.uncertainty is None else restore(out.uncertainty[0, 0].float())))
        logits = mean_over_views([o[0] for o in outs]).cpu().numpy()
        low_res = out.low_res_logits if len(outs) == 1 else None
        return Prediction(
            masks=remove_small_components(logits > 0, min_component),
            scores=mean_over_views([o[1] for o in outs]).cpu().numpy(),
            logits=logits,
            low_res_logits=None if low_res is None else low_res[0].float().cpu().numpy(),
            uncertainty=None if outs[0][2] is None else mean_over_views([o[2] for o in outs]).cpu().numpy(),
        )

    def _mask_prompt(self, mask_input) -> torch.Tensor:
        """Low-res logits (h, w) / (1, h, w) as they are, or an original-size mask converted."""
        from imedsam.sam.prepare import mask_to_low_res

        low = tuple(self.system.prompt_encoder.mask_input_size)
        m = np.asarray(mask_input)
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.shape == low and m.dtype != bool:
            t = torch.as_tensor(m.astype(np.float32))
        else:
            t = mask_to_low_res(m, self._prepared, low)
        return t.view(1, 1, *low).to(self.device)

    def warm_up(self, size: tuple[int, int] = (256, 256)) -> None:
        """One embedding and one decode of a blank ``size`` image on a :meth:`fork` (this Segmenter's image and
        interaction are untouched), so that a server's first real request runs at its steady speed: on a model's
        first calls oneDNN builds its kernels and reorders weights (0.1-0.9 s more on LiteMedSAM, 2 cores).
        The decode uses a box, or a point, whichever the system takes; a prompt-free system is only encoded."""
        twin = self.fork()
        twin.set_image(np.zeros((*size, 3), dtype=np.uint8))
        h, w = size
        if "box" in self.system.prompt_types:
            twin.predict(box=(w * 0.25, h * 0.25, w * 0.75, h * 0.75))
        elif "points" in self.system.prompt_types:
            twin.predict(points=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))

    # ------------------------------------------------------------------------------------------ interaction
    @property
    def history(self) -> list[Interaction]:
        """The interaction so far, oldest first (``refine`` appends, ``undo`` pops, ``reset`` clears)."""
        return list(self._history)

    def refine(self, point: tuple[float, float] | None = None, label: int = 1, *,
               box: tuple[float, float, float, float] | None = None, size: tuple[int, int] | None = None,
               uncertainty: bool = False) -> Prediction:
        """Add a click (``point`` in original pixels, ``label`` 1 foreground / 0 background) and/or set the box,
        and decode with the box, every click so far and, when the system takes mask prompts, the previous
        prediction's low-res logits. Returns the new prediction (one mask); ``undo`` goes back one step."""
        self._require_image()
        if point is None and box is None:
            raise ImedsamError("refine: give a point (x, y) with its label, and/or a box")
        last = self._history[-1] if self._history else None
        new_box = tuple(float(v) for v in box) if box is not None else (last.box if last else None)
        clicks = last.clicks if last else ()
        if point is not None:
            if label not in (0, 1):
                raise ImedsamError(f"refine: label must be 1 (foreground) or 0 (background), got {label!r}")
            clicks = clicks + ((float(point[0]), float(point[1]), int(label)),)
        points = labels = None
        if clicks:
            points = np.array([c[:2] for c in clicks], dtype=np.float64)
            labels = np.array([c[2] for c in clicks], dtype=np.int64)
        mask_input = None
        if last is not None and last.prediction.low_res_logits is not None and "mask" in self.system.prompt_types \
                and len(self._encoded) == 1:
            mask_input = last.prediction.low_res_logits[:1]
        pred = self.predict(box=new_box, points=points, point_labels=labels, mask_input=mask_input, size=size,
                            uncertainty=uncertainty)
        self._history.append(Interaction(new_box, clicks, pred))
        return pred

    def undo(self) -> Prediction | None:
        """Drop the last interaction step; returns the prediction now current (None when nothing is left)."""
        if self._history:
            self._history.pop()
        return self._history[-1].prediction if self._history else None

    def reset(self) -> None:
        """Forget the interaction (the image and its embedding stay)."""
        self._history = []

    def _require_image(self) -> None:
        if self._prepared is None:
            raise ImedsamError("no image set: call set_image(array) before predict()")
