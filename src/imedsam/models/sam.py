"""Zero-shot SAM-family system: backbone + prompt encoder + SAM mask decoder, no adaptation."""

from __future__ import annotations

import torch

from imedsam.errors import ImedsamError
from imedsam.infer.prepare import PreparedImage, restore_logits
from imedsam.models.base import DecodeResult, Prompts, SegmentationSystem
from imedsam.sam.model import SamModel


class ZeroShotSam(SegmentationSystem):
    """A :class:`~imedsam.sam.model.SamModel` answering prompts with SAM's own mask decoder."""

    def __init__(self, sam: SamModel) -> None:
        super().__init__()
        self.sam = sam
        self.preprocess = sam.preprocess

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return self.sam.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        if uncertainty:
            raise ImedsamError("--uncertainty: SAM's mask decoder gives no uncertainty map; use --model imedsam")
        points = (prompts.points, prompts.labels) if prompts.points is not None else None
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.mask_input)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        logits = restore_logits(low_res, prepared, size)
        return DecodeResult(logits=logits, scores=iou.float(), low_res_logits=low_res.float())
