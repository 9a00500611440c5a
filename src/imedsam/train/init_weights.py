"""Start a training run from another run's trained tensors (``run.init_from``).

The use: fine-tune a variant of a trained model instead of training it from scratch, e.g. MA-SAM's box-prompted
variant from the automatic run (the same tensors: FacT, 3-D adapters, prompt encoder, mask decoder), or a longer
schedule from a short one. Every trainable tensor of the new system whose name and shape the source holds is
copied; the others keep their seeded initialisation. The source must hold the same system (``model.system``); a
tensor of the same name but another shape is an error (the two configs build different models).

Only the weights are taken: the optimizer, schedule, step count and random state start afresh (``--resume`` is
the way to continue a run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)

ARGUMENT = "run.init_from"


@dataclass
class InitSource:
    """The tensors of ``run.init_from``, read and checked before any data is read or model built."""

    file: Path
    system: str
    state: dict[str, torch.Tensor] = field(repr=False)


def read_init_source(path: str | Path, system: str) -> InitSource:
    """Read ``path`` (a run folder: its ``best.safetensors``, else ``adapter.safetensors``; or an adapter file)
    and check it holds a ``system`` model; errors name ``run.init_from``."""
    from imedsam.models.registry import resolve_adapter_file
    from imedsam.peft.files import load_adapters

    file = resolve_adapter_file(path, argument=ARGUMENT)
    try:
        state, saved = load_adapters(file)
    except ImedsamError as exc:
        raise ImedsamError(f"{ARGUMENT}: {exc}") from None
    model = saved.get("model", saved) if isinstance(saved, dict) else {}
    source_system = model.get("system") if isinstance(model, dict) else None
    if source_system is None:
        raise ImedsamError(f"{ARGUMENT}: {file} records no model.system; give the adapter file or folder of an "
                           "imedsam training run")
    if source_system != system:
        raise ImedsamError(f"{ARGUMENT}: {file} holds a {source_system!r} model; this config trains {system!r} "
                           "(start from a run of the same system)")
    return InitSource(file=file, system=source_system, state=state)


def load_init_weights(system: nn.Module, source: InitSource) -> dict[str, int]:
    """Copy ``source``'s tensors into ``system``'s trainable ones (same name and shape); returns the counts
    ``{"loaded", "kept", "unused"}``: tensors copied, trainable tensors left at their initialisation, tensors of
    the file the system does not have. Refuses a source that shares no tensor with the system."""
    from imedsam.peft.files import load_adapter_state_dict

    try:
        missing, unexpected = load_adapter_state_dict(system, source.state, strict=False)
    except ImedsamError as exc:
        raise ImedsamError(f"{ARGUMENT}: {source.file}: {exc}") from None
    loaded = len(source.state) - len(unexpected)
    if loaded == 0:
        raise ImedsamError(f"{ARGUMENT}: {source.file} shares no trainable tensor with this model; start from a run "
                           "of the same system and backbone")
    counts = {"loaded": loaded, "kept": len(missing), "unused": len(unexpected)}
    log.info("%s: %d trainable tensors from %s; %d kept their initialisation%s; %d of the file unused%s", ARGUMENT,
             loaded, source.file, len(missing), f" ({', '.join(missing[:5])}...)" if missing else "",
             len(unexpected), f" ({', '.join(unexpected[:5])}...)" if unexpected else "")
    return counts
