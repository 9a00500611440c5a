"""Typed training configuration: YAML file + ``key.sub=value`` overrides; the resolved config is saved per run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imedsam.errors import ImedsamError
from imedsam.models.config import ModelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    image_size: int = Field(256, ge=16, description="training grid: images and masks resized to S x S")
    train_split: str = "train"
    val_split: str = "val"
    box_expand: tuple[float, float] = Field((0.0, 20.0), description="training box jitter: expand each side "
                                                                     "by U[a, b) pixels (reference: 0-19 px)")
    augment: bool = True
    min_foreground: int = Field(10, ge=0, description="3D data: keep slices with at least this many fg pixels")
    num_workers: int = Field(0, ge=0)


class OptimSettings(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)
    lr_decoder: float = Field(1e-3, gt=0, description="implicit decoder (paper: 1e-3)")
    lr_adapter: float = Field(5e-5, gt=0, description="LoRA, FA, prompt encoder, upscaler (paper: 5e-5)")
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    coarse_warm_epochs: int = Field(5, ge=0, description="coarse-loss weight decays linearly to 0 over these")
    points_per_image: int = Field(4096, ge=1, description="query points sampled per image and step")
    boundary_fraction: float = Field(0.5, ge=0, le=1, description="share of points drawn near mask boundaries")
    box_fraction: float = Field(0.0, ge=0, le=1, description="share of points drawn inside the prompt box "
                                                             "(at most 1 - boundary_fraction)")
    bce_weight: float = 0.5
    dice_weight: float = 0.5
    grad_clip: float | None = 1.0
    ema_decay: float | None = Field(None, gt=0, lt=1, description="validate and keep an exponential moving "
                                                                  "average of the weights (e.g. 0.98); null: off")
    max_steps: int | None = Field(None, description="stop after this many optimizer steps (smoke tests)")

    @model_validator(mode="after")
    def _point_shares(self) -> OptimSettings:
        if self.boundary_fraction + self.box_fraction > 1:
            raise ValueError(f"boundary_fraction + box_fraction = {self.boundary_fraction + self.box_fraction} "
                             "exceeds 1; lower one of them")
        return self


class RunSettings(_Strict):
    seed: int = 2023
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    val_every: int = Field(1, ge=1, description="validate every N epochs (best checkpoint chosen on val only)")
    val_size: int | None = Field(None, description="validation output grid; default the original image size")


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    run: RunSettings = RunSettings()


def _parse_value(text: str):
    value = yaml.safe_load(text)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ImedsamError(f"override {item!r}: expected KEY=VALUE, e.g. optim.epochs=5")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ImedsamError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or defaults when None), apply overrides, validate; errors name the bad key."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ImedsamError(f"--config: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ImedsamError(f"--config: {path} is not valid YAML ({exc.__class__.__name__})") from None
    raw = apply_overrides(raw, overrides or [])
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ImedsamError(f"config key {where}: {err['msg']} (source {path or 'defaults'})") from None


def config_to_dict(config: TrainConfig) -> dict:
    return config.model_dump(mode="json")
