"""SAM's own decoding, shared by the systems that keep SAM's mask decoder, and the zero-shot system ``sam``.

:class:`SamDecoding` answers box, point and mask prompts with SAM's prompt encoder and two-way-transformer mask
decoder (low-res logits at 4x the embedding grid, resized once to the requested grid of the original image).
:class:`ZeroShotSam` is a SAM-family backbone used as it is (``--model litemedsam``, ``--model sam_vit_b``...).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.models.base import DecodeResult, Prompts, SegmentationSystem
from imedsam.models.config import SystemConfig
from imedsam.models.spec import SystemSpec
from imedsam.sam.build import build_sam
from imedsam.sam.model import SamModel
from imedsam.sam.prepare import PreparedImage, restore_logits


class SamDecoding(SegmentationSystem):
    """A system whose decoder is SAM's: ``prompt_encoder`` + ``mask_decoder`` (box, points, mask prompts).

    One point alone (no box, no mask) is ambiguous (part or whole?): as SAM recommends, its 3 multimask outputs
    are computed and the best predicted IoU is kept, unless ``multimask`` asks for all three.
    """

    prompt_types: ClassVar[frozenset[str]] = frozenset({"box", "points", "mask"})

    def prompt_embeddings(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's sparse ``(B, n, C)`` and dense ``(B, C, h, w)`` prompt embeddings."""
        points = (prompts.points, prompts.labels) if prompts.points is not None else None
        return self.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.mask_input)

    def sam_masks(self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        """Low-res logits ``(B, k, 4h, 4w)`` over the S x S input and predicted IoU ``(B, k)``; ``B`` prompt sets
        share a batch-1 embedding or have one each."""
        sparse, dense = self.prompt_embeddings(prompts)
        return self.mask_decoder(image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask)

    def select(self, low_res: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimask outputs ``(B, 3, ...)`` and ``(B, 3)`` -> the best predicted IoU's ``(B, 1, ...)``, ``(B, 1)``."""
        best = iou.argmax(dim=1)
        rows = torch.arange(iou.shape[0], device=iou.device)
        return low_res[rows, best][:, None], iou[rows, best][:, None]

    def predict_low_res(self, embeddings: torch.Tensor, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor, torch.Tensor]:
        """Training and interaction: ``(chosen logits (B,1,4h,4w), chosen IoU (B,1), all logits, all IoU)``; with
        ``config.multimask_output`` the chosen mask is the best predicted IoU of SAM's 3, else SAM's single mask."""
        low_res, iou = self.sam_masks(embeddings, prompts, getattr(self.config, "multimask_output", False))
        if low_res.shape[1] > 1:
            chosen, chosen_iou = self.select(low_res, iou)
            return chosen, chosen_iou, low_res, iou
        return low_res, iou, low_res, iou

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        if uncertainty:
            raise ImedsamError(f"--uncertainty: model {self.name!r} (SAM's mask decoder) gives no uncertainty map; "
                               "use --model imedsam")
        single_point = (prompts.boxes is None and prompts.mask_input is None and prompts.points is not None
                        and prompts.points.shape[1] == 1)
        low_res, iou = self.sam_masks(embeddings, prompts, multimask or single_point)
        if single_point and not multimask:  # SAM's advice for one ambiguous click: best of its 3 masks
            best = iou.argmax(dim=1)
            rows = torch.arange(iou.shape[0], device=iou.device)
            low_res, iou = low_res[rows, best][:, None], iou[rows, best][:, None]
        logits = restore_logits(low_res, prepared, size)
        return DecodeResult(logits=logits, scores=iou.float(), low_res_logits=low_res.float())


class ZeroShotConfig(SystemConfig):
    """A SAM-family backbone used as it is."""

    system: str = "sam"


class ZeroShotSam(SamDecoding):
    """A :class:`~imedsam.sam.model.SamModel` answering prompts with SAM's own mask decoder."""

    name: ClassVar[str] = "sam"

    def __init__(self, sam: SamModel, config: ZeroShotConfig | None = None) -> None:
        super().__init__()
        self.sam = sam
        self.config = config or ZeroShotConfig()
        self.preprocess = sam.preprocess

    @property
    def prompt_encoder(self):  # the SAM submodules keep their official key names under ``sam.``
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self):
        return self.sam.mask_decoder

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return self.sam.image_encoder(images)

    def encoder_module(self) -> nn.Module:
        return self.sam.image_encoder


def build_zero_shot(config: ZeroShotConfig, *, pretrained: bool = True) -> ZeroShotSam:
    sam = build_sam(config.backbone, checkpoint=config.checkpoint, img_size=config.img_size, pretrained=pretrained)
    system = ZeroShotSam(sam, config)
    system.name = config.backbone  # type: ignore[misc]  # messages name the model the user chose
    return system


def _breakdown(system: ZeroShotSam) -> dict[str, int]:
    return {"(none: zero-shot)": 0}


SPEC = SystemSpec(name="sam", cls=ZeroShotSam, description="a SAM-family backbone used zero-shot",
                  config=ZeroShotConfig, build=build_zero_shot, breakdown=_breakdown)
