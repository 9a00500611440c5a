"""The registry entry of a system (:data:`imedsam.models.registry.SYSTEMS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from imedsam.models.base import SegmentationSystem
from imedsam.models.config import SystemConfig

__all__ = ["SystemSpec"]


@dataclass(frozen=True)
class SystemSpec:
    """A registered system.

    Attributes:
        name: registry name (``model.system`` in configs, ``--model`` on the command line).
        cls: the system's class: its capabilities (``prompt_types``, ``prompt_free``, ``stack_depth``...) are
            known without building it.
        description: one line for ``imedsam info``.
        config: its config class (a :class:`~imedsam.models.config.SystemConfig`).
        build: ``build(config, *, pretrained=True) -> SegmentationSystem`` (base weights loaded, adapters fresh).
        breakdown: ``breakdown(system) -> {group: trainable parameters}`` for ``imedsam info``.
        objective: name of its training objective (:mod:`imedsam.train.objectives`); empty: zero-shot only.
        vit_size: the encoder input size the system uses on ViT backbones by default (the paper's).
        options: extra ``imedsam info`` options the breakdown takes (e.g. ``num_classes``), by config path.
    """

    name: str
    cls: type[SegmentationSystem]
    description: str
    config: type[SystemConfig]
    build: Callable[..., SegmentationSystem]
    breakdown: Callable[[SegmentationSystem], dict[str, int]]
    objective: str = ""
    vit_size: int = 1024
    options: dict[str, str] = field(default_factory=dict)
