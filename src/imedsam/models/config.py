"""Typed configuration of assembled systems (pydantic; loads from YAML, accepts ``a.b=value`` overrides)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeftSettings(_Strict):
    """Encoder adapters (see :mod:`imedsam.peft`)."""

    lora_rank: int = Field(4, ge=0, description="LoRA rank on q and v (0 disables LoRA)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale alpha/rank; None = rank (plain W + BA)")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_gate: bool | None = Field(None, description="reference code's input-dependent gate g = w.mean(x); "
                                                     "None follows the mode (paper: off, reference: on)")
    frequency: bool = Field(True, description="frequency adapter (FFT amplitude stream)")
    fa_hidden: int = Field(4, ge=1, description="frequency adapter bottleneck width")
    fa_scale: float = Field(0.5, description="merge scale of the frequency adapter, parallel to the MLP")
    fa_gate_init: float | None = Field(None, description="None (I-MedSAM): add scale*F from step 0; a number: a "
                                                        "learnable per-block gate on F starting there (0.0 = the "
                                                        "pretrained encoder exactly at init)")
    log_amplitude: bool | None = Field(None, description="log1p-compress the FFT amplitude; None follows the "
                                                         "mode (paper: on, reference: off)")


class DecoderSettings(_Strict):
    """Implicit decoder (see :mod:`imedsam.decoders.implicit`)."""

    encoding: Literal["paper", "reference"] = "paper"
    num_octaves: int = Field(10, ge=1)
    coarse_hidden: tuple[int, ...] = (1024, 512)
    coarse_feature_dim: int = 256
    fine_hidden: tuple[int, ...] = (256, 256, 128)
    dropout: float = Field(0.5, ge=0, lt=1)
    mc_samples: int = Field(8, ge=1, description="Monte-Carlo dropout passes T for the uncertainty")
    topk_ratio: float = Field(0.125, ge=0, le=1, description="fraction of most uncertain points refined per image")
    chunk_size: int = Field(16384, ge=1,
                            description="points decoded per chunk (bounds memory; 16384 was fastest on 2 CPU cores)")
    adaptive: bool = Field(False, description="inference on output grids at least 4x finer than the decoder "
                                              "features: evaluate exactly only near the decision boundary, "
                                              "interpolate elsewhere (fast large grids; an approximation)")
    sam_prior: bool = Field(False, description="add the backbone's own SAM mask logit (its low-res mask, "
                                               "bilinearly interpolated at each query point) to the implicit "
                                               "decoder's logits; the logit heads start at zero, so the system "
                                               "starts as the zero-shot backbone")
    train_transformer: bool = Field(False, description="also train the backbone's SAM two-way transformer and its "
                                                       "output tokens (frozen in I-MedSAM, systems.md A.5; "
                                                       "trained in SAM-Med2D and MA-SAM), at the adapter learning "
                                                       "rate: lets a box prompt learn to separate the objects "
                                                       "inside it; +3.3M parameters on LiteMedSAM")


class ModelConfig(_Strict):
    """An assembled system."""

    system: Literal["imedsam", "sam"] = "imedsam"
    backbone: str = Field("litemedsam", description="registry name of the SAM-family backbone")
    checkpoint: str | None = Field(None, description="base weights; default per backbone")
    img_size: int | None = Field(None, description="encoder input size (ViT backbones: any multiple of 16)")
    mode: Literal["paper", "reference"] = "paper"
    peft: PeftSettings = PeftSettings()
    decoder: DecoderSettings = DecoderSettings()
