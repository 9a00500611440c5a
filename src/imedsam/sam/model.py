"""The SAM-family container: image encoder + prompt encoder + mask decoder, and how its input is prepared.

State-dict keys are those of the official checkpoints (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``); the pixel mean/std are non-persistent buffers (official SAM checkpoints do not hold them),
and :class:`Preprocess` states the whole input convention so that ``imedsam.sam.prepare`` can build the
encoder input in one place.

Coordinates: prompts given to :meth:`SamModel.decode` are in ENCODER-INPUT pixels (the S x S padded image),
x to the right and y down, points ``(x, y)`` and boxes ``(x0, y0, x1, y1)``, as SAM's own model takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "Preprocess", "SamModel"]

SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocess:
    """How a backbone expects its (B, 3, S, S) input.

    Attributes:
        img_size: encoder input side S.
        normalize: ``"sam"``: RGB on the 0-255 scale, ``(x - pixel_mean) / pixel_std`` per channel (SAM, MobileSAM);
            ``"minmax"``: per image ``(x - min) / max(max - min, 1e-8)`` to [0, 1] (LiteMedSAM, as trained and as its
            official inference does); ``"unit"``: ``x / 255`` without mean/std.
        pixel_mean: per-channel mean for ``"sam"`` (RGB, 0-255 scale).
        pixel_std: per-channel std for ``"sam"``.
        resize_longest_side: the longest side is resized to S keeping the aspect ratio (SAM's ResizeLongestSide).
        pad: the resized image is zero padded at the bottom/right to S x S, after normalisation.
        pipeline: ``"imedsam"``: the image is resized as float (antialiased bilinear) and prompts are scaled per
            axis by ``new / old`` (exact); ``"official"``: MedSAM-lite's own inference script, bit for bit (for
            ``"minmax"`` backbones: OpenCV area resampling of the uint8 image, one scale ``S / max(H, W)`` for
            both axes and box corners floored to integers; needs ``opencv-python-headless``).
    """

    img_size: int
    normalize: Literal["sam", "minmax", "unit"] = "sam"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    resize_longest_side: bool = True
    pad: Literal["bottom_right"] = "bottom_right"
    pipeline: Literal["imedsam", "official"] = "imedsam"

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ImedsamError(f"img_size={self.img_size} must be positive")
        if self.normalize not in ("sam", "minmax", "unit"):
            raise ImedsamError(f"normalize={self.normalize!r}: expected 'sam', 'minmax' or 'unit'")
        if self.pipeline not in ("imedsam", "official"):
            raise ImedsamError(f"--preprocess {self.pipeline!r}: expected 'imedsam' or 'official'")
        if self.pipeline == "official" and self.normalize != "minmax":
            raise ImedsamError("--preprocess official: reproduces MedSAM-lite's inference script, for LiteMedSAM "
                               "(min-max input); this backbone takes SAM's input, use --preprocess imedsam")

    def normalize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise resized, unpadded images (B, 3, h, w) (values as read, 0-255 for ``"sam"``/``"unit"``).

        ``"minmax"`` uses each image's own min/max (over all its channels and pixels).
        """
        x = x.float()
        if self.normalize == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            return (x - lo) / torch.clamp(hi - lo, min=1e-8)
        if self.normalize == "unit":
            return x / 255.0
        mean = torch.tensor(self.pixel_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class SamModel(nn.Module):
    """SAM-compatible model: ``image_encoder`` (ViT or TinyViT), ``prompt_encoder``, ``mask_decoder``.

    Args:
        image_encoder: (B, 3, S, S) -> (B, C, h, w) with ``C = prompt_encoder.embed_dim`` and
            ``(h, w) = prompt_encoder.image_embedding_size``.
        prompt_encoder: a :class:`imedsam.sam.prompt_encoder.PromptEncoder` with ``input_image_size == (S, S)``.
        mask_decoder: a :class:`imedsam.sam.mask_decoder.MaskDecoder`.
        preprocess: the input convention (``img_size`` must equal S).
    """

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 preprocess: Preprocess) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.preprocess = preprocess
        input_size = tuple(prompt_encoder.input_image_size)
        if input_size != (preprocess.img_size, preprocess.img_size):
            raise ValueError(f"prompt encoder input size {input_size} != preprocess.img_size {preprocess.img_size}")
        self.register_buffer("pixel_mean", torch.tensor(preprocess.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def img_size(self) -> int:
        """Encoder input side S."""
        return self.preprocess.img_size

    @property
    def embedding_size(self) -> tuple[int, int]:
        """(h, w) of the image embedding grid."""
        return tuple(self.prompt_encoder.image_embedding_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) already preprocessed images -> (B, C, h, w) image embeddings."""
        s = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ImedsamError(f"images: expected a preprocessed (B, 3, {s}, {s}) tensor, got {tuple(images.shape)}; "
                               "prepare it with imedsam.sam.prepare.prepare_image")
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompt sets.

        Args:
            embeddings: (B, C, h, w) or (1, C, h, w) (shared by all prompt sets) image embeddings.
            points: ``(coords (B, N, 2) xy, labels (B, N))`` in encoder-input pixels; label 1 foreground,
                0 background, -1 padding.
            boxes: (B, 4) or (B, 1, 4) xyxy in encoder-input pixels.
            masks: (B, 1, 4h, 4w) low-resolution mask logits from a previous prediction.
            multimask: return the 3 multimask outputs instead of the single-mask output.

        Returns:
            ``(low_res_logits (B, k, 4h, 4w), iou (B, k))`` with k = 3 if ``multimask`` else 1; the logits cover
            the whole S x S input (threshold 0).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def forward(self, images: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(images), ...)``: one prompt set per image."""
        return self.decode(self.encode(images), points=points, boxes=boxes, masks=masks, multimask=multimask)
