"""Typed training configuration: YAML file + ``key.sub=value`` overrides; the resolved config is saved per run.

One tree reaches every option::

    model:     the system's own config (imedsam.models.registry: I-MedSAM, SAM-Med2D, ...), chosen by model.system
    data:      dataset, sampling, augmentation (AugmentConfig), prompts of the training boxes
    optim:     optimizer, learning rates, schedule, length
    objective: the system's training objective's options (imedsam.train.objectives), chosen by the system
    run:       seed, device, precision, validation

Errors name the key (``config key optim.epochs: ...``) and whether it came from the file or an override.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from imedsam.data.augment import AugmentConfig
from imedsam.errors import ImedsamError
from imedsam.models.config import SystemConfig

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    image_size: int = Field(256, ge=16, description="training grid: images and masks resized to S x S")
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = Field(0.1, ge=0, lt=1, description="without a val split: hold out this share of the "
                                                             "training cases (whole cases, seeded) to validate on")
    box_expand: tuple[float, float] = Field((0.0, 20.0), description="training box jitter: expand each side "
                                                                     "by U[a, b) pixels (reference: 0-19 px)")
    box_shift: float = Field(0.0, ge=0, description="training box jitter: shift the box by U[-m, m) px per axis, "
                                                    "m = min(box_shift, half the box side) (SAM-Med2D: 5)")
    box_component: Literal["all", "largest"] = Field("all", description="training box of the whole mask or of "
                                                                        "its largest component (SAM-Med2D)")
    objects: Literal["classes", "components"] = Field("classes", description="objects of an image: each class "
                                                                             "of its label map, or each connected "
                                                                             "component")
    min_object_fraction: float = Field(0.0, ge=0, lt=1, description="drop objects under this share of the image "
                                                                    "(SAM-Med2D: 0.00153)")
    augment: bool = True
    augmentation: AugmentConfig = AugmentConfig()
    min_foreground: int = Field(10, ge=1, description="keep objects (and 3D slices) with at least this many pixels")
    num_workers: int = Field(0, ge=0)

    @field_validator("box_expand")
    @classmethod
    def _expand(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"{list(v)} must be [low, high] pixels with 0 <= low <= high")
        return v


class OptimSettings(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1, description="images per step")
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr_decoder: float = Field(1e-3, gt=0, description="the system's decoder group (I-MedSAM: implicit decoder, "
                                                      "paper 1e-3; SAM-Med2D: prompt encoder + mask decoder)")
    lr_adapter: float = Field(5e-5, gt=0, description="the system's adapter group (I-MedSAM: LoRA, FA, prompt "
                                                      "encoder, upscaler, paper 5e-5; SAM-Med2D: encoder adapters)")
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="validate and keep an exponential moving "
                                                                  "average of the weights (e.g. 0.98); null: off")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke tests)")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget of the run (training and its "
                                                              "validations, summed over resumes): stop after the "
                                                              "step during which it runs out, then validate and "
                                                              "checkpoint as at an epoch's end; null: none")


class RunSettings(_Strict):
    seed: int = 2023
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    val_every: int = Field(1, ge=1, description="validate every N epochs (best checkpoint chosen on val only)")
    val_size: tuple[int, int] | None = Field(None, description="validation output grid [H, W]; default the "
                                                               "original image size")
    val_stack_stride: int = Field(1, ge=1, description="validation of stack models (MA-SAM) on volumes: a stack "
                                                       "centred on every N-th slice (--stack-stride; at most the "
                                                       "stack depth), N times fewer passes")
    init_from: str | None = Field(None, description="start from the trained tensors of this run folder (its best "
                                                    "checkpoint) or adapter file, same system: tensors of the same "
                                                    "name and shape copied, the others keep their seeded "
                                                    "initialisation; optimizer and schedule start afresh "
                                                    "(imedsam.train.init_weights); null: the system's own "
                                                    "initialisation")

    @field_validator("val_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return [v, v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("val_size")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"{list(v)} must be positive [H, W] (or one number for a square grid)")
        return v


class TrainConfig(_Strict):
    model: SerializeAsAny[SystemConfig]
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    objective: SerializeAsAny[BaseModel]
    run: RunSettings = RunSettings()

    @model_validator(mode="before")
    @classmethod
    def _dispatch(cls, raw: Any) -> Any:
        """``model`` by its system, ``objective`` by the system's objective (both from the registries)."""
        from imedsam.models.registry import get_system, validate_model_config
        from imedsam.train.objectives import objective_config

        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        model = validate_model_config(raw.get("model") or {"system": "imedsam"})
        raw["model"] = model
        objective = raw.get("objective") or {}
        if not isinstance(objective, BaseModel):
            config_cls = objective_config(get_system(model.system).objective)
            try:
                objective = config_cls.model_validate(objective)
            except ValidationError as exc:
                from imedsam.models.registry import validation_message

                raise ImedsamError(validation_message(exc, "objective")) from None
        raw["objective"] = objective
        return raw


#: I-MedSAM objective keys that older configs kept under ``optim`` (moved to ``objective``).
_MOVED_TO_OBJECTIVE = ("coarse_warm_epochs", "points_per_image", "boundary_fraction", "box_fraction", "bce_weight",
                       "dice_weight")


def _parse_value(text: str):
    return yaml.safe_load(text)


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


def _move_old_keys(raw: dict) -> None:
    optim = raw.get("optim")
    if isinstance(optim, dict):
        moved = [k for k in _MOVED_TO_OBJECTIVE if k in optim]
        if moved:
            objective = raw.setdefault("objective", {})
            for key in moved:
                objective.setdefault(key, optim.pop(key))
            log.warning("config: %s moved from optim to objective (read from optim this time)", ", ".join(moved))


def validate_config(raw: dict, source: str = "defaults") -> TrainConfig:
    """A raw config dict -> :class:`TrainConfig`; errors name the key and the source."""
    raw = dict(raw)
    _move_old_keys(raw)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        from imedsam.models.registry import validation_message

        raise ImedsamError(f"{validation_message(exc, '')} (source {source})") from None
    except ImedsamError as exc:
        raise ImedsamError(f"{exc} (source {source})") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or defaults when None), apply overrides, validate; errors name the bad key and say
    whether it came from the file or the command line."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ImedsamError(f"--config: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ImedsamError(f"--config: {path} is not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict):
            raise ImedsamError(f"--config: {path} must hold a mapping (model:, data:, optim:, ...)")
    file_config = validate_config(raw, str(path or "defaults"))
    if not overrides:
        return file_config
    return validate_config(apply_overrides(raw, list(overrides)), "command-line override")


def config_to_dict(config: TrainConfig) -> dict:
    return config.model_dump(mode="json")
