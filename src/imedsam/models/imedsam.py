"""I-MedSAM assembled: a SAM-family backbone + LoRA(q, v) + frequency adapter + implicit coarse-to-fine decoder.

Data flow (one image; systems.md §A.0 with the §A.19 fixes in ``paper`` mode)::

    image (1,3,S,S) --encoder+LoRA+FA--> E (1,C,h,w)
    box/points --prompt encoder--> sparse (1,n,C), dense (1,C,h,w); dense PE (1,C,h,w)
    [E + dense, PE, tokens] --SAM two-way transformer (frozen)--> image tokens (1,C,h,w)
        --output_upscaling (trainable)--> U (1,C/8,4h,4w)
    U, PE, query coordinates of the REQUESTED grid --implicit decoder--> logits (1,1,H_o,W_o) (+ uncertainty)

Trainable: LoRA A/B (and gates in reference mode), the frequency adapters, the whole prompt encoder,
``mask_decoder.output_upscaling`` and the implicit decoder; everything else is frozen (systems.md §A.5). In
``reference`` mode on ViT-B (binary) that is exactly 1,595,742 parameters. The option
``decoder.train_transformer`` also trains the two-way transformer and the IoU/mask tokens (as SAM-Med2D and
MA-SAM do): with a frozen transformer a box around several separate objects is filled whole.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from imedsam.decoders.coords import sample_features
from imedsam.decoders.implicit import (
    ImplicitDecoder,
    ImplicitDecoderConfig,
    ImplicitOutput,
    sample_training_points,
)
from imedsam.errors import ImedsamError
from imedsam.models.base import DecodeResult, Prompts, SegmentationSystem, trainable_breakdown
from imedsam.models.config import SystemConfig
from imedsam.models.spec import SystemSpec
from imedsam.peft import PeftConfig, inject_adapters
from imedsam.sam.build import build_sam
from imedsam.sam.model import SamModel
from imedsam.sam.prepare import PreparedImage, grid_query_coords

log = logging.getLogger(__name__)

TRANSFORMER_PARTS = ("transformer", "iou_token", "mask_tokens")  # of the mask decoder: decoder.train_transformer


class IMedSAMDecoderConfig(ImplicitDecoderConfig):
    """The implicit decoder's options, plus how it sits on SAM's mask-decoder trunk."""

    sam_prior: bool = Field(False, description="add the backbone's own SAM mask logit (its low-res mask, "
                                               "bilinearly interpolated at each query point) to the implicit "
                                               "decoder's logits; the logit heads start at zero, so the system "
                                               "starts as the zero-shot backbone")
    train_transformer: bool = Field(False, description="also train the backbone's SAM two-way transformer and its "
                                                       "output tokens (frozen in I-MedSAM, systems.md A.5; "
                                                       "trained in SAM-Med2D and MA-SAM), at the adapter learning "
                                                       "rate: lets a box prompt learn to separate the objects "
                                                       "inside it; +3.3M parameters on LiteMedSAM")


class IMedSAMConfig(SystemConfig):
    """I-MedSAM: ``peft`` (LoRA + frequency adapter, :class:`imedsam.peft.PeftConfig`) and ``decoder``."""

    system: Literal["imedsam"] = "imedsam"
    peft: PeftConfig = PeftConfig()
    decoder: IMedSAMDecoderConfig = IMedSAMDecoderConfig()


def set_adaptive_decoding(system: SegmentationSystem, enabled: bool = True, argument: str = "--adaptive") -> None:
    """Switch an I-MedSAM system's implicit decoder to adaptive grid decoding or back to exact decoding
    (inference; see :class:`imedsam.decoders.implicit.ImplicitDecoderConfig`). Other systems raise a one-line
    error."""
    if not isinstance(system, IMedSAM):
        raise ImedsamError(f"{argument}: only the implicit decoder decodes adaptively; use --model imedsam "
                           "(or --run of a trained I-MedSAM)")
    system.decoder.config.adaptive = enabled


class IMedSAM(SegmentationSystem):
    """I-MedSAM on any SAM-family backbone (see the module docstring)."""

    name: ClassVar[str] = "imedsam"
    prompt_types: ClassVar[frozenset[str]] = frozenset({"box", "points", "mask"})
    has_uncertainty: ClassVar[bool] = True
    val_protocols: ClassVar[tuple[str, ...]] = ("box",)
    #: the fine branch runs on the uncertain points selected per process (none at all without dropout)
    batch_conditional_modules: ClassVar[tuple[str, ...]] = ("decoder.fine_trunk", "decoder.fine_heads")

    def __init__(self, sam: SamModel, config: IMedSAMConfig) -> None:
        super().__init__()
        self.config = config
        for param in sam.parameters():
            param.requires_grad_(False)
        self.image_encoder = inject_adapters(sam.image_encoder, config.peft, config.mode)
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.prompt_encoder.requires_grad_(True)
        self.mask_decoder.output_upscaling.requires_grad_(True)
        if config.decoder.train_transformer:
            for part in TRANSFORMER_PARTS:
                getattr(self.mask_decoder, part).requires_grad_(True)
        dim = self.mask_decoder.transformer_dim
        self.decoder = ImplicitDecoder(config.decoder, feature_dim=dim // 8, prompt_dim=dim, mode=config.mode)
        if config.decoder.sam_prior:
            self._zero_logit_heads()
        preprocess = sam.preprocess
        if config.mode == "reference" and preprocess.normalize == "sam":
            preprocess = dataclasses.replace(preprocess, normalize="unit")  # the official code's [0, 1] input
        self.preprocess = preprocess

    # ----------------------------------------------------------------- shared trunk
    def encode(self, images: torch.Tensor, valid_hw=None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, h, w); ``valid_hw`` (the un-padded size) reaches the frequency branch, the only
        part that must ignore the padding (without it, ``peft.frequency=false``, it is not needed)."""
        return self.image_encoder(images, valid_hw=valid_hw)

    def _features(self, embeddings: torch.Tensor,
                  prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoder-trunk features U (B, C/8, 4h, 4w), the dense prompt PE (1, C, h, w) and, with ``sam_prior``,
        the backbone's own single-mask SAM logits (B, 1, 4h, 4w) (else None)."""
        points = (prompts.points, prompts.labels) if prompts.points is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.mask_input)
        pe = self.prompt_encoder.get_dense_pe()
        tokens, image_tokens = self.mask_decoder.run_transformer(embeddings, pe, sparse, dense)
        features = self.mask_decoder.upscale(image_tokens)
        prior = None
        if self.config.decoder.sam_prior:  # SAM's mask 0: hypernetwork(mask token 0) . U, linear in U
            hyper = self.mask_decoder.output_hypernetworks_mlps[0](tokens[:, 1, :])  # (B, C/8)
            prior = torch.einsum("bc,bchw->bhw", hyper, features)[:, None]
        return features, pe, prior

    def _zero_logit_heads(self) -> None:
        """Zero the logit outputs of the coarse and fine heads, so that logits start as the SAM prior."""
        with torch.no_grad():
            for head in self.decoder.coarse_heads:
                head.weight[0].zero_()
                head.bias[0].zero_()
            for head in self.decoder.fine_heads:
                last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.zero_()
                last.bias.zero_()

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The implicit decoder at ``optim.lr_decoder``; the adapters, prompt encoder, upscaler (and, with
        ``train_transformer``, the two-way transformer) at ``optim.lr_adapter``."""
        groups: dict[str, list[torch.nn.Parameter]] = {"decoder": [], "adapters": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups["decoder" if name.startswith("decoder.") else "adapters"].append(param)
        return groups

    # ----------------------------------------------------------------- training
    def forward_train(self, images: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, *, n_points: int,
                      boundary_fraction: float = 0.5, box_fraction: float = 0.0,
                      generator: torch.Generator | None = None,
                      points: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One training forward on ``n_points`` sampled query points per image.

        Args:
            images: (B, 3, S, S) normalised encoder input (square, no padding).
            boxes: (B, 4) xyxy in encoder-input pixels. masks: (B, 1, S, S) {0, 1} targets.
            boundary_fraction, box_fraction: shares of the points drawn near mask boundaries and inside the
            box (:func:`imedsam.decoders.implicit.sample_training_points`); the rest are uniform.
            points: the query points and their targets, ``(coords (B, N, 2), targets (B, N))``, already drawn
            (a process of a multi-process run draws them for the global batch); ``masks`` is then not read.
        Returns:
            coarse logits (B, 1, N), fine logits (B, 1, N), targets (B, 1, N).
        """
        embeddings = self.encode(images)
        features, pe, prior = self._features(embeddings, Prompts(boxes=boxes.view(-1, 1, 4)))
        if points is None:
            points = sample_training_points(masks, n_points, boundary_fraction, generator=generator, boxes=boxes,
                                            box_fraction=box_fraction)
        coords, targets = points
        coords = coords.to(features.device)
        out = self.decoder(features, pe, coords=coords)
        coarse, fine = out.coarse_logits, out.fine_logits
        if prior is not None:
            at_points = sample_features(prior, coords).transpose(1, 2)  # (B, 1, N)
            coarse, fine = coarse + at_points, fine + at_points
        return coarse, fine, targets[:, None, :].to(fine.dtype)

    # ----------------------------------------------------------------- inference
    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        size = tuple(size or prepared.original_size)
        features, pe, prior = self._features(embeddings, prompts)
        if prepared.input_size == (prepared.img_size, prepared.img_size):
            out = self.decoder(features, pe, size=size, seed=seed, prior_logits=prior)  # the grid covers the input
            if prior is not None:
                prior = F.interpolate(prior.float(), size=size, mode="bilinear", align_corners=False)
        elif self.decoder.config.adaptive:  # padded input: decode the whole frame at the output's pitch, crop
            out, prior = self._decode_padded_adaptive(features, pe, prior, prepared, size, seed)
        else:  # padded input: query the pixel centres of the valid region only
            coords = grid_query_coords(prepared, size, features.device)[None]
            out = self.decoder(features, pe, coords=coords, seed=seed)
            if prior is not None:
                prior = sample_features(prior.float(), coords).transpose(1, 2)
        logits = out.fine_logits.float().reshape(1, 1, *size)
        if prior is not None:
            logits = logits + prior.reshape(1, 1, *size)
        prob = torch.sigmoid(logits)
        fg = prob > 0.5
        score = prob[fg].mean() if bool(fg.any()) else torch.zeros((), device=prob.device)
        unc = None
        if uncertainty:
            if out.uncertainty is None:
                raise ImedsamError("--uncertainty: this decoder computed none (reference mode has no MC dropout "
                                   "at inference); use mode paper")
            unc = out.uncertainty.float().reshape(1, 1, *size)
        return DecodeResult(logits=logits, scores=score.view(1, 1), uncertainty=unc)

    def _decode_padded_adaptive(self, features: torch.Tensor, pe: torch.Tensor, prior: torch.Tensor | None,
                                prepared: PreparedImage, size: tuple[int, int], seed: int):
        """Adaptive decoding needs a grid over the whole encoder frame: decode the padded frame on the grid
        with the output's pixel pitch, then keep its top-left ``size`` block (the valid region). Pixel centres
        agree with the exact valid-region grid within half an output pixel; top-k counts frame pixels."""
        s = prepared.img_size
        new_h, new_w = prepared.input_size
        frame = (max(size[0], round(size[0] * s / new_h)), max(size[1], round(size[1] * s / new_w)))
        out = self.decoder(features, pe, size=frame, seed=seed, prior_logits=prior)
        crop = (..., slice(0, size[0]), slice(0, size[1]))
        out = ImplicitOutput(*(t[crop] if t is not None else None for t in (out.coarse_logits, out.fine_logits,
                                                                           out.uncertainty, out.selected)))
        if prior is not None:
            prior = F.interpolate(prior.float(), size=frame, mode="bilinear", align_corners=False)[crop]
        return out, prior

def build_imedsam(config: IMedSAMConfig, *, pretrained: bool = True) -> IMedSAM:
    """I-MedSAM on its backbone (base weights loaded, adapters and decoder freshly initialised)."""
    sam = build_sam(config.backbone, checkpoint=config.checkpoint, img_size=config.img_size, pretrained=pretrained)
    return IMedSAM(sam, config)


def breakdown(system: IMedSAM) -> dict[str, int]:
    """Trainable parameters per group (``imedsam info --model imedsam``)."""
    groups = {
        "LoRA (A, B)": lambda n: ".lora_A." in n or ".lora_B." in n,
        "LoRA gates": lambda n: ".lora_gate." in n,
        "frequency adapters": lambda n: ".mlp_parallel.frequency." in n,
        "prompt encoder": lambda n: n.startswith("prompt_encoder."),
        "output_upscaling": lambda n: n.startswith("mask_decoder.output_upscaling."),
        "two-way transformer + tokens": lambda n: n.startswith(tuple(f"mask_decoder.{p}" for p in TRANSFORMER_PARTS)),
    }
    for part, count in system.decoder.parameter_groups().items():
        if part != "total":
            prefix = {"coarse_trunk": "decoder.coarse_trunk.", "fine_trunk": "decoder.fine_trunk.",
                      "coarse_head": "decoder.coarse_heads.", "fine_head": "decoder.fine_heads."}[part]
            groups[f"implicit decoder: {part}"] = (lambda p: lambda n: n.startswith(p))(prefix)
    return trainable_breakdown(system, groups)


SPEC = SystemSpec(
    name="imedsam", cls=IMedSAM,
    description="I-MedSAM: LoRA(q,v) + frequency adapter + implicit coarse-to-fine decoder",
    config=IMedSAMConfig, build=build_imedsam, breakdown=breakdown, objective="implicit_points", vit_size=384,
    options={"num_classes": "decoder.num_classes"})
