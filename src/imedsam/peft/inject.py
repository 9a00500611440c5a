"""I-MedSAM's adapters (LoRA on q/v + Frequency Adapter) attached to a SAM-family image encoder.

Nothing in :mod:`imedsam.sam` knows about adapters. A backbone is built and its official checkpoint loaded
into the *unmodified* model first; then :func:`inject_adapters` attaches the adapters at the encoder's named
insertion points (:mod:`imedsam.sam.insertion`); no block's forward is re-implemented here:

1. every encoder parameter is frozen and every frozen ``BatchNorm`` (TinyViT) pinned to its running statistics
   (:func:`imedsam.peft.backbone.freeze_backbone`), so the adapter file alone describes what was trained;
2. ``qkv``: the fused ``attn.qkv`` Linear of every selected attention block becomes a
   :class:`~imedsam.peft.lora.LoRAQKV` (contiguous ``[q|k|v]`` layout for SAM's ViT, per-head interleaved for
   TinyViT), so the frozen weight moves to ``...attn.qkv.base.weight``;
3. with the frequency adapter on: ``encoder.streams["frequency"]`` (:class:`~imedsam.peft.frequency.FrequencyStream`)
   computes the frequency tokens, and every attention block gets a
   :class:`~imedsam.peft.frequency.FrequencyAdapter` in its ``mlp_parallel`` slot, under the name
   ``"frequency"``. The encoder is modified in place and returned.

ViT (SAM ViT-B/L/H, systems.md §A.4)
------------------------------------
``F_0 = encoder.embed(frequency_image(x))`` uses the *same* frozen patch embedding and absolute position
embedding as the image tokens. Block ``i`` then runs::

    x   = x + attn(norm1(x))               (windowed or global, with LoRA at qkv)
    F_i = FA_i(F_{i-1})                    (the mlp_parallel slot)
    x   = x + mlp(norm2(x)) + scale * F_i

and the frozen neck maps the tokens to the image embedding. ``F`` never sees attention or the MLPs.

TinyViT (LiteMedSAM / MobileSAM)
--------------------------------
TinyViT has no single patch embedding and no position embedding: a convolutional stem (``patch_embed``), a
stage of MBConv blocks at full stem resolution (``layers[0]``), then three attention stages whose token grid and
width change at each ``PatchMerging`` (``downsample``). The frequency stream is placed as follows::

    F   = layers[0].downsample(patch_embed(frequency_image(x)))        stage-1 grid and width (stream.follow)
    for each attention stage s = 1, 2, 3:
        for each block:   x = x + attn(windows(x)); x = local_conv(x)
                          F = FA(F);  x = x + mlp(x) + scale * F
        x = downsample_s(x);  F = downsample_s(F)                      (stages 1 and 2)

Why this placement:

* **Same frozen embedding, no new projection.** I-MedSAM embeds the frequency image with the image's own frozen
  patch embedding. In TinyViT the frozen operators that take pixels to stage-1 tokens, and stage-s tokens to
  stage-(s+1) tokens, are the stem and the ``PatchMerging`` layers; reusing them gives ``F`` the right grid and
  width at every attention stage without a learned projection (a learned C_s -> C_(s+1) map would cost more
  parameters than all the FAs together).
* **F skips the backbone's blocks.** In the ViT, ``F`` passes through the embedding and the FAs only, never
  through transformer blocks. The MBConv blocks of stage 0 are blocks, not embedding, so ``F`` skips them
  (``PatchMerging`` accepts the stem's width). This also keeps the frequency stream cheap: stage 0 runs at the
  stem's full resolution (256 x 256 x 64 for LiteMedSAM) and dominates TinyViT's cost; the stem and merges
  alone add a few per cent.
* **Parallel to the MLP, after local_conv.** As in the ViT, ``scale * F_i`` joins the residual stream in the
  same step as the MLP output, i.e. after the block's attention and depthwise ``local_conv``; one FA per
  attention block (10 for LiteMedSAM's depths 2, 6, 2), chained within and across stages.
* Stage 0 (MBConv) has no attention and gets neither LoRA nor an FA.

Block selection
---------------
``PeftConfig.lora_blocks`` selects LoRA blocks by index in the flat list of attention blocks
(:func:`imedsam.peft.backbone.attention_blocks`). The FA is in every block, because its stream is chained.

Adapter files: :mod:`imedsam.peft.files`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.peft.backbone import attention_blocks, block_width, freeze_backbone
from imedsam.peft.frequency import FrequencyAdapter, FrequencyStream
from imedsam.peft.lora import attach_lora

logger = logging.getLogger(__name__)

__all__ = ["PeftConfig", "inject_adapters"]

Mode = Literal["paper", "reference"]


class PeftConfig(BaseModel):
    """I-MedSAM's encoder adapters: the ``model.peft`` section of an I-MedSAM config.

    ``None`` fields follow the system's mode (``paper``: the corrected method, systems.md §A.19; ``reference``: the
    official code's behaviour, quirks included):

    ============================ ========= ==========================================
    field                        paper     reference
    ============================ ========= ==========================================
    ``lora_gate``                False     True  (g = w . mean_tokens(x), no alpha/r)
    ``log_amplitude``            True      False
    ``fa_norm_trainable``        True      False (LN_f frozen at weight 1, bias 0)
    frequency-image grayscale    mean RGB  255 * channel 0 (bug §F.2)
    ============================ ========= ==========================================
    """

    model_config = ConfigDict(extra="forbid")

    lora_rank: int = Field(4, ge=0, description="LoRA rank on the targets (0 disables LoRA)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale alpha/rank; null = rank (plain W + BA)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    lora_targets: tuple[Literal["q", "k", "v"], ...] = Field(("q", "v"), min_length=1,
                                                             description="projections LoRA adapts")
    lora_gate: bool | None = Field(None, description="reference code's input-dependent gate g = w.mean(x); "
                                                     "null follows the mode (paper: off, reference: on)")
    lora_blocks: Literal["all"] | tuple[int, ...] = Field("all", description="'all' or indices of attention blocks")
    frequency: bool = Field(True, description="frequency adapter (FFT amplitude stream)")
    fa_hidden: int = Field(4, ge=1, description="frequency adapter bottleneck width")
    fa_scale: float = Field(0.5, description="merge scale of the frequency adapter, parallel to the MLP")
    fa_gate_init: float | None = Field(None, description="null (I-MedSAM): add scale*F from step 0; a number: a "
                                                        "learnable per-block gate on F starting there (0.0 = the "
                                                        "pretrained encoder exactly at init)")
    fa_norm_trainable: bool | None = Field(None, description="train the FA's LayerNorm; null follows the mode")
    log_amplitude: bool | None = Field(None, description="log1p-compress the FFT amplitude; null follows the "
                                                         "mode (paper: on, reference: off)")

    @field_validator("lora_targets")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v))

    @field_validator("lora_blocks")
    @classmethod
    def _sorted(cls, v: Any) -> Any:
        return v if v == "all" else tuple(sorted(set(v)))

    def gate(self, mode: Mode) -> bool:
        """Resolved ``lora_gate``."""
        return mode == "reference" if self.lora_gate is None else bool(self.lora_gate)

    def log(self, mode: Mode) -> bool:
        """Resolved ``log_amplitude``."""
        return mode != "reference" if self.log_amplitude is None else bool(self.log_amplitude)

    def norm_trainable(self, mode: Mode) -> bool:
        """Resolved ``fa_norm_trainable``."""
        return mode != "reference" if self.fa_norm_trainable is None else bool(self.fa_norm_trainable)


def inject_adapters(encoder: nn.Module, config: PeftConfig | None = None, mode: Mode = "paper") -> nn.Module:
    """Freeze ``encoder`` and attach the adapters of ``config`` (module docstring); returns ``encoder``.

    Args:
        encoder: an :class:`~imedsam.sam.vit.ImageEncoderViT` or :class:`~imedsam.sam.tiny_vit.TinyViT`, with
            its base weights loaded; modified in place. Only the adapter parameters require grad afterwards;
            new modules are created on the device and dtype of the encoder's parameters.
        config: the adapters (default ``PeftConfig()``).
        mode: ``"paper"`` or ``"reference"`` (resolves the ``None`` fields of ``config``).
    """
    config = PeftConfig() if config is None else config
    if not isinstance(config, PeftConfig):
        raise ImedsamError(f"inject_adapters: config must be a PeftConfig, got {type(config).__name__}")
    if mode not in ("paper", "reference"):
        raise ImedsamError(f"peft mode must be 'paper' or 'reference', got {mode!r}")
    freeze_backbone(encoder)
    blocks = attention_blocks(encoder)
    ref = next(encoder.parameters())
    if config.lora_rank > 0:
        chosen = attach_lora(encoder, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                             targets=config.lora_targets, gate=config.gate(mode),
                             blocks=None if config.lora_blocks == "all" else config.lora_blocks)
        alpha = config.lora_rank if config.lora_alpha is None else config.lora_alpha
        scaling = "gated" if config.gate(mode) else f"alpha/rank={alpha / config.lora_rank:g}"
        logger.info("LoRA rank %d on %s of %d/%d attention blocks (%s)", config.lora_rank,
                    "".join(config.lora_targets), len(chosen), len(blocks), scaling)
    if config.frequency:
        encoder.streams["frequency"] = FrequencyStream(reference=mode == "reference", log_amplitude=config.log(mode))
        for block in blocks:
            adapter = FrequencyAdapter(block_width(block), hidden=config.fa_hidden, scale=config.fa_scale,
                                       skip=True, norm_trainable=config.norm_trainable(mode),
                                       gate_init=config.fa_gate_init)
            block.mlp_parallel["frequency"] = adapter.to(device=ref.device, dtype=ref.dtype)
        logger.info("frequency adapters: %d (hidden %d, scale %g, %s mode)", len(blocks), config.fa_hidden,
                    config.fa_scale, mode)
    return encoder
