"""What every assembled system offers the inference, training and evaluation code.

A system owns a backbone (image encoder), a prompt encoder and a decoder. It is asked for logits on a GRID of
the original image (any size), never for "its" resolution: discrete decoders produce native logits and resize
once (:func:`imedsam.infer.prepare.restore_logits`); implicit decoders evaluate the grid directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imedsam.infer.prepare import PreparedImage


@dataclass
class Prompts:
    """Prompts for ONE image, in encoder-input pixel coordinates (see :mod:`imedsam.infer.prepare`).

    Attributes:
        points: (1, N, 2) float xy, or None.
        labels: (1, N) int, 1 foreground / 0 background, or None.
        boxes: (1, 4) float xyxy, or None.
        mask_input: (1, 1, 4h, 4w) logits from a previous prediction (SAM's low-res mask), or None.
    """

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None


@dataclass
class DecodeResult:
    """Decoder output for one image.

    Attributes:
        logits: (1, K, H_o, W_o) float32 logits on the requested grid of the original image (K masks).
        scores: (1, K) predicted IoU (SAM) or mean confidence (implicit decoder) per mask.
        low_res_logits: (1, K, 4h, 4w) logits usable as the next ``mask_input``; None for implicit decoders.
        uncertainty: (1, 1, H_o, W_o) per-pixel uncertainty (variance of MC-dropout probabilities) or None.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    low_res_logits: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None


class SegmentationSystem(nn.Module):
    """Base class: ``encode`` once per image, ``decode`` per prompt set."""

    #: how the backbone wants its input (set by subclasses): an :class:`imedsam.sam.model.Preprocess`
    preprocess = None

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, S, S) prepared images -> (B, C, h, w) image embeddings.

        ``valid_hw``: the un-padded (h, w) inside the S x S input, for encoders that must ignore padding.
        """
        raise NotImplementedError

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        """Decode one image's prompts onto a grid (default: the original size) of the original image."""
        raise NotImplementedError
