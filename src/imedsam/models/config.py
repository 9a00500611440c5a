"""The typed configuration of assembled systems (pydantic; loads from YAML, takes ``a.b=value`` overrides).

Every system declares one config class (in its own module) that extends :class:`SystemConfig` with its
sections; the ``model`` section of a training config is the union of the registered classes, told apart by
``system`` (:func:`imedsam.models.registry.validate_model_config`). Adapter and decoder options are the
adapter's and decoder's own pydantic models (e.g. :class:`imedsam.peft.PeftConfig`,
:class:`imedsam.decoders.implicit.ImplicitDecoderConfig`), so every option is reachable from YAML and defined
once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A config section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


class SystemConfig(Strict):
    """What every system has: a SAM-family backbone, its weights, its input size and a mode."""

    system: str = Field(description="registry name of the system (`imedsam info`)")
    backbone: str = Field("litemedsam", description="registry name of the SAM-family backbone")
    checkpoint: str | None = Field(None, description="base weights; default per backbone (LiteMedSAM bundled)")
    img_size: int | None = Field(None, ge=16, description="encoder input size (ViT backbones: any multiple of 16); "
                                                          "null: the backbone's (training: data.image_size)")
    mode: Literal["paper", "reference"] = Field("paper", description="paper: the published method with the fixes "
                                                                     "of systems.md; reference: the official code")
    preprocess: Literal["imedsam", "official"] = Field(
        "imedsam", description="inference input pipeline: imedsam (antialiased resize, exact per-axis prompt "
                               "scaling) or official (MedSAM-lite's script bit for bit: OpenCV area resize, floored "
                               "box; LiteMedSAM only, needs opencv-python-headless)")
