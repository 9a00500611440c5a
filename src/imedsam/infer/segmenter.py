"""`Segmenter`: embed an image once, answer many prompts, on any output grid.

Example::

    seg = Segmenter("litemedsam")
    seg.set_image(array)                      # (H, W) or (H, W, 3); computes the embedding once
    pred = seg.predict(box=(30, 40, 90, 100)) # prompts in ORIGINAL image pixel coordinates
    pred.masks                                # (K, H, W) bool on the original grid
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from imedsam.errors import ImedsamError
from imedsam.infer.postprocess import remove_small_components
from imedsam.infer.prepare import PreparedImage, check_box, check_points, prepare_image, to_input_coords
from imedsam.io.sample import Sample
from imedsam.models.base import Prompts, SegmentationSystem
from imedsam.runtime import autocast, autocast_dtype, prepare_for_inference, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Masks for one prompt set.

    Attributes:
        masks: (K, H_o, W_o) bool, ``sigmoid(logits) > 0.5``.
        scores: (K,) predicted IoU (SAM decoders) or mean foreground confidence (implicit decoder).
        logits: (K, H_o, W_o) float32.
        low_res_logits: (K, h, w) float32 SAM low-res logits, reusable as ``mask_input``; None otherwise.
        uncertainty: (H_o, W_o) float32 per-pixel uncertainty, when asked for; else None.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    low_res_logits: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


class Segmenter:
    """Caches one image embedding and decodes prompts onto any grid of that image.

    Args:
        model: a registry name (see ``imedsam info``) or an already built :class:`SegmentationSystem`.
        checkpoint: base weights for the backbone (official SAM ``.pth``, LiteMedSAM ...); default per model.
        adapter: trained adapter weights (``adapter.safetensors`` of a run, or its folder) for adapted systems.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: ``auto`` (bf16 autocast on CPUs with native bf16 and on CUDA), ``fp32``, ``bf16``, ``fp16``.
            A model built here from its name is frozen and keeps its Linear/Conv weights in that dtype
            (:func:`imedsam.runtime.prepare_for_inference`); a system passed in is left as it is.
        seed: seed of the Monte-Carlo dropout passes (uncertainty), so that repeated calls agree.
    """

    def __init__(self, model: str | SegmentationSystem = "litemedsam", *, checkpoint: str | None = None,
                 adapter: str | None = None, device: str = "auto", precision: str = "auto", seed: int = 0,
                 **model_options) -> None:
        self.device = resolve_device(device)
        owned = isinstance(model, str)
        if owned:
            from imedsam.models.registry import build_system

            model = build_system(model, checkpoint=checkpoint, adapter=adapter, **model_options)
        self.amp_dtype = autocast_dtype(self.device, precision)
        # a system built here is only used for inference; one passed in may still be trained elsewhere
        self.system = (prepare_for_inference(model, self.device, self.amp_dtype) if owned
                       else model.to(self.device).eval())
        self.seed = seed
        self._prepared: PreparedImage | None = None
        self._embedding: torch.Tensor | None = None

    @property
    def original_size(self) -> tuple[int, int]:
        self._require_image()
        return self._prepared.original_size

    def set_image(self, image: np.ndarray | Sample) -> None:
        """Compute and cache the embedding of a 2D image ((H, W) gray or (H, W, 3) RGB, display scale)."""
        if isinstance(image, Sample):
            from imedsam.io import to_display_rgb

            image = to_display_rgb(image)
        self._prepared = prepare_image(np.asarray(image), self.system.preprocess, self.device)
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            self._embedding = self.system.encode(self._prepared.tensor, valid_hw=self._prepared.input_size)

    def predict(self, box=None, points=None, point_labels=None, mask_input=None, *, multimask: bool = False,
                size: tuple[int, int] | None = None, uncertainty: bool = False,
                min_component: int = 0) -> Prediction:
        """Decode prompts given in ORIGINAL image pixel coordinates.

        Args:
            box: (x0, y0, x1, y1).
            points: (N, 2) xy; ``point_labels``: (N,) 1 foreground / 0 background.
            mask_input: (h, w) or (1, h, w) low-res logits from a previous ``Prediction.low_res_logits``.
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
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise ImedsamError(f"--size: output grid must be at least 1x1, got {size[0]}x{size[1]}")
        prompts = Prompts()
        if box is not None:
            b = to_input_coords(check_box(box, prepared.original_size), prepared)
            prompts.boxes = torch.as_tensor(b, dtype=torch.float32, device=self.device).view(1, 4)
        if points is not None:
            if point_labels is None:
                point_labels = np.ones(len(np.asarray(points).reshape(-1, 2)), dtype=np.int64)
            p, lab = check_points(points, point_labels, prepared.original_size)
            prompts.points = torch.as_tensor(to_input_coords(p, prepared), dtype=torch.float32,
                                             device=self.device).view(1, -1, 2)
            prompts.labels = torch.as_tensor(lab, device=self.device).view(1, -1)
        if mask_input is not None:
            m = torch.as_tensor(np.asarray(mask_input, dtype=np.float32), device=self.device)
            prompts.mask_input = m.view(1, 1, *m.shape[-2:])
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            out = self.system.decode(self._embedding, prepared, prompts, multimask=multimask, size=size,
                                     uncertainty=uncertainty, seed=self.seed)
        logits = out.logits[0].float().cpu().numpy()
        return Prediction(
            masks=remove_small_components(logits > 0, min_component),
            scores=out.scores[0].float().cpu().numpy(),
            logits=logits,
            low_res_logits=None if out.low_res_logits is None else out.low_res_logits[0].float().cpu().numpy(),
            uncertainty=None if out.uncertainty is None else out.uncertainty[0, 0].float().cpu().numpy(),
        )

    def _require_image(self) -> None:
        if self._prepared is None:
            raise ImedsamError("no image set: call set_image(array) before predict()")
