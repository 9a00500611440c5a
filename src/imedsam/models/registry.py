"""One registry of assembled systems.

A system is one module in :mod:`imedsam.models` that defines its config class, its ``nn.Module`` and a
:class:`SystemSpec`; adding a system is that file plus one line in :data:`SYSTEMS`. The SAM-family backbones
(``litemedsam``, ``mobilesam``, ``sam_vit_b/l/h`` and the tiny test configs, :mod:`imedsam.sam.build`) are also
model names: used alone they are the zero-shot system ``sam`` on that backbone.
"""

from __future__ import annotations

import dataclasses

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from imedsam.errors import ImedsamError
from imedsam.models.base import SegmentationSystem
from imedsam.models.config import SystemConfig
from imedsam.models.spec import SystemSpec

log = logging.getLogger(__name__)

ADAPTER_FILES = ("best.safetensors", "adapter.safetensors")


def _specs() -> dict[str, SystemSpec]:
    from imedsam.models import imedsam, masam, sam, sammed2d

    return {spec.name: spec for spec in (sam.SPEC, imedsam.SPEC, sammed2d.SPEC, masam.SPEC)}


SYSTEMS: dict[str, SystemSpec] = _specs()


def backbone_names() -> list[str]:
    from imedsam.sam.build import list_models

    return list_models()


def describe_models() -> dict[str, str]:
    """Name -> one-line description, for `imedsam info` and error messages."""
    from imedsam.sam.build import describe_models as describe_backbones

    adapted = {name: spec.description for name, spec in SYSTEMS.items() if name != "sam"}
    return {**describe_backbones(), **adapted}


def get_system(name: str) -> SystemSpec:
    if name not in SYSTEMS:
        known = ", ".join(backbone_names() + [n for n in SYSTEMS if n != "sam"])
        raise ImedsamError(f"--model: unknown model {name!r}; known models: {known}")
    return SYSTEMS[name]


def validate_model_config(raw: dict | SystemConfig, where: str = "model") -> SystemConfig:
    """A ``model`` config section (dict, e.g. from YAML or an adapter file) -> its system's typed config.

    Errors name the key (``model.peft.lora_rank: ...``) and, for an unknown ``system``, the known ones.
    """
    if isinstance(raw, SystemConfig):
        return raw
    if not isinstance(raw, dict):
        raise ImedsamError(f"config key {where}: expected a mapping, got {type(raw).__name__}")
    name = raw.get("system", "imedsam")
    if name not in SYSTEMS:
        raise ImedsamError(f"config key {where}.system: unknown system {name!r}; choose one of "
                           f"{', '.join(SYSTEMS)}")
    try:
        return SYSTEMS[name].config.model_validate({**raw, "system": name})
    except ValidationError as exc:
        raise ImedsamError(validation_message(exc, where)) from None


def validation_message(exc: ValidationError, where: str) -> str:
    """One line naming the first invalid key of a pydantic error and what is allowed."""
    err = exc.errors()[0]
    key = ".".join(([where] if where else []) + [str(p) for p in err["loc"]])
    detail = err["msg"]
    if err["type"] == "extra_forbidden":
        detail = "unknown key"
    elif err.get("ctx", {}).get("expected"):
        detail = f"{detail} (got {err.get('input')!r})"
    return f"config key {key}: {detail}"


def resolve_adapter_file(adapter: str | Path, argument: str = "--adapter") -> Path:
    """An adapter file, or a run folder (its ``best.safetensors``, else ``adapter.safetensors``); errors name
    ``argument``."""
    path = Path(adapter)
    if path.is_dir():
        for name in ADAPTER_FILES:
            if (path / name).exists():
                return path / name
        raise ImedsamError(f"{argument}: no {' or '.join(ADAPTER_FILES)} in {path}; is it a training run folder?")
    if not path.exists():
        raise ImedsamError(f"{argument}: file not found: {path}")
    return path


def saved_config(adapter: str | Path) -> tuple[Path, SystemConfig]:
    """The adapter file of ``adapter`` (file or run folder) and the system config saved with it."""
    from imedsam.peft.files import load_adapters

    path = resolve_adapter_file(adapter)
    _, saved = load_adapters(path)
    saved = saved or {}
    return path, validate_model_config(saved.get("model", saved), where=f"{path} model")


def model_config(name: str, *, backbone: str | None = None, checkpoint: str | Path | None = None,
                 **options: Any) -> SystemConfig:
    """The config of ``--model NAME`` (a system, or a backbone used zero-shot) with the given options."""
    if name in backbone_names():
        if backbone is not None and backbone != name:
            raise ImedsamError(f"--backbone: model {name!r} is itself a backbone (zero-shot); --backbone goes "
                               f"with an adapted model ({', '.join(n for n in SYSTEMS if n != 'sam')})")
        if options:
            raise ImedsamError(f"model {name!r} is used zero-shot and takes no options {sorted(options)}")
        return validate_model_config({"system": "sam", "backbone": name, "checkpoint": checkpoint})
    get_system(name)
    if backbone is not None and backbone not in backbone_names():
        raise ImedsamError(f"--backbone: unknown backbone {backbone!r}; known backbones: "
                           f"{', '.join(backbone_names())}")
    raw: dict[str, Any] = {"system": name, "checkpoint": None if checkpoint is None else str(checkpoint)}
    if backbone is not None:
        raw["backbone"] = backbone
    for key, value in options.items():  # dotted keys reach nested sections: "peft.lora_rank"
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_model_config(raw)


def system_class(name: str | None, *, adapter: str | Path | None = None) -> type[SegmentationSystem]:
    """The class of what ``--model NAME`` / ``--adapter RUN`` would build (its capabilities), without building it."""
    if adapter is not None:
        _, saved = saved_config(adapter)
        if name is not None and name != saved.system:
            raise ImedsamError(f"--adapter: {adapter} was trained as model {saved.system!r}, not {name!r}")
        return get_system(saved.system).cls
    if name is None or name in backbone_names():
        return SYSTEMS["sam"].cls
    return get_system(name).cls


def build_system(name: str | None = None, *, config: SystemConfig | dict | None = None,
                 checkpoint: str | Path | None = None, adapter: str | Path | None = None,
                 backbone: str | None = None, pretrained: bool = True, preprocess: str | None = None,
                 **options: Any) -> SegmentationSystem:
    """Build a system by ``name`` (or from ``config``); ``adapter`` (file or run folder) loads trained weights
    and the config they were trained with (``name`` may then be omitted). ``preprocess`` (``imedsam`` |
    ``official``) overrides the config's inference input pipeline (:class:`imedsam.sam.model.Preprocess`)."""
    adapter_file = None
    if adapter is not None:
        adapter_file, saved = saved_config(adapter)
        if name is not None and name in backbone_names():
            raise ImedsamError(f"--adapter: model {name!r} is used zero-shot; adapters need the model they were "
                               f"trained as ({saved.system})")
        if name is not None and name != saved.system:
            raise ImedsamError(f"--adapter: {adapter_file} was trained as model {saved.system!r}, not {name!r}")
        changes = {k: v for k, v in {"checkpoint": None if checkpoint is None else str(checkpoint)}.items()
                   if v is not None}
        config = saved.model_copy(update=changes)
    elif config is None:
        if name is None:
            raise ImedsamError("build_system: give a model name, a config or an adapter")
        config = model_config(name, backbone=backbone, checkpoint=checkpoint, **options)
    config = validate_model_config(config)
    if preprocess is not None:
        config = validate_model_config({**config.model_dump(), "preprocess": preprocess})
    _check_preprocess(config)
    system = get_system(config.system).build(config, pretrained=pretrained)
    if system.preprocess.pipeline != config.preprocess:
        system.preprocess = dataclasses.replace(system.preprocess, pipeline=config.preprocess)
    if adapter_file is not None:
        system.load_trainable(adapter_file)
        log.info("loaded adapter %s", adapter_file)
    return system


def _check_preprocess(config: SystemConfig) -> None:
    """``preprocess: official`` before any weights load: a LiteMedSAM (min-max) backbone and OpenCV present."""
    if config.preprocess != "official":
        return
    from imedsam.sam.build import get_spec
    from imedsam.sam.prepare import require_opencv

    if get_spec(config.backbone).normalize != "minmax":
        raise ImedsamError(f"--preprocess official: reproduces MedSAM-lite's inference script, for LiteMedSAM; "
                           f"backbone {config.backbone!r} takes SAM's input, use --preprocess imedsam")
    require_opencv()


def parameter_breakdown(name: str, *, backbone: str | None = None, mode: str | None = None,
                        img_size: int | None = None, **options: Any) -> dict:
    """Trainable parameters per group of a system (built on the meta device: no weights, no memory)."""
    if name in backbone_names():
        if mode is not None:
            raise ImedsamError(f"--mode: model {name!r} is used zero-shot and has no mode; --mode goes with an "
                               f"adapted model ({', '.join(n for n in SYSTEMS if n != 'sam')})")
        if options:
            raise ImedsamError(f"model {name!r} is used zero-shot and takes no options {sorted(options)}")
        spec, raw = SYSTEMS["sam"], {"system": "sam", "backbone": name}
    else:
        spec = get_system(name)
        raw = {"system": name, **({"backbone": backbone} if backbone else {}), **({"mode": mode} if mode else {})}
        for key, value in options.items():
            if value is None:
                continue
            if key not in spec.options:
                raise ImedsamError(f"model {name!r} takes no option {key!r}")
            node = raw
            *parents, leaf = spec.options[key].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    config = validate_model_config(raw)
    from imedsam.sam.build import get_spec

    if get_spec(config.backbone).encoder == "vit" and config.img_size is None:
        config = config.model_copy(update={"img_size": img_size or spec.vit_size})
    elif img_size is not None:
        config = config.model_copy(update={"img_size": img_size})
    meta = torch.device("meta") if config.checkpoint is None else nullcontext()
    with meta:
        system = spec.build(config, pretrained=False)
    groups = spec.breakdown(system)
    return {"model": name, "backbone": config.backbone, "mode": getattr(config, "mode", "zero-shot")
            if name not in backbone_names() else "zero-shot", "img_size": system.preprocess.img_size,
            "trainable": groups, "total_trainable": sum(groups.values()),
            "total": sum(p.numel() for p in system.parameters())}
