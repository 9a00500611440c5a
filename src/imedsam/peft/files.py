"""Adapter files and counts: the trainable tensors of an adapted model, written and read with safetensors.

:func:`adapter_state_dict` holds exactly the tensors with ``requires_grad=True`` (named as in the adapted model)
plus the buffers of fully trained modules (BatchNorm running statistics of a trained decoder);
:func:`save_adapters` writes them with safetensors, the config as a JSON string in the file's metadata (key
``"config"``), atomically (temporary file in the same folder, then ``os.replace``). Files of the first format
(``imedsam-adapters/1``, I-MedSAM before the encoders had insertion points) are renamed on load
(:func:`migrate_v1_keys`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FORMAT",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "load_adapters",
    "migrate_v1_keys",
    "save_adapters",
    "trainable_parameters",
]

ADAPTER_FORMAT = "imedsam-adapters/2"
_V1_FORMAT = "imedsam-adapters/1"


def trainable_parameters(module: nn.Module) -> dict[str, int]:
    """Count the parameters with ``requires_grad=True`` by group.

    Returns ``{"lora": A and B matrices, "lora_gate": gate vectors, "frequency_adapter": FA down/up (and LN_f
    when trainable), "med2d_adapter": SAM-Med2D adapters, "other": anything else trainable (e.g. a prompt
    encoder), "total": the sum}``.
    """
    from imedsam.peft.frequency import FrequencyAdapter
    from imedsam.peft.lora import LoRAQKV
    from imedsam.peft.med2d import Med2DAdapter

    group_of: dict[int, str] = {}
    for m in module.modules():
        if isinstance(m, LoRAQKV):
            for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters()):
                group_of[id(p)] = "lora"
            if m.lora_gate is not None:
                for p in m.lora_gate.parameters():
                    group_of[id(p)] = "lora_gate"
        elif isinstance(m, FrequencyAdapter):
            for p in m.parameters():
                group_of[id(p)] = "frequency_adapter"
        elif isinstance(m, Med2DAdapter):
            for p in m.parameters():
                group_of[id(p)] = "med2d_adapter"
    counts = {"lora": 0, "lora_gate": 0, "frequency_adapter": 0, "med2d_adapter": 0, "other": 0}
    for p in module.parameters():
        if p.requires_grad:
            counts[group_of.get(id(p), "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus the buffers of trained modules (e.g. BatchNorm running statistics).

    A module's buffers belong to the adapter file when the module has parameters and all of them are trainable:
    the running statistics of a trained BatchNorm are part of what was learned, while a frozen module's buffers
    come with the base weights.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and all(p.requires_grad for p in params):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name in module._buffers and name not in module._non_persistent_buffers_set:
                    tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters with ``requires_grad=True`` and the buffers of trained modules
    (BatchNorm running statistics), detached, on their device."""
    return {name: t.detach() for name, t in _trained_tensors(model).items()}


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy adapter tensors into ``model``'s trainable parameters.

    The expected keys are those of :func:`adapter_state_dict(model) <adapter_state_dict>`. With ``strict`` a
    missing or unexpected key raises :class:`ImedsamError` naming them; otherwise the common keys are loaded.
    A shape mismatch always raises. Returns ``(missing, unexpected)``.
    """
    params = _trained_tensors(model)
    if any(".encoder." in k or ".adapters." in k for k in state_dict) and set(state_dict) - set(params):
        state_dict = migrate_v1_keys(state_dict, model)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise ImedsamError(f"adapter weights do not match the model ({'; '.join(parts)}); build the model with "
                           "the same peft config as the one the adapters were trained with")
    with torch.no_grad():
        for name in params.keys() & state_dict.keys():
            src, dst = state_dict[name], params[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ImedsamError(f"adapter weight {name!r} has shape {tuple(src.shape)}, the model expects "
                                   f"{tuple(dst.shape)}; build the model with the adapters' config")
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    return missing, unexpected


def save_adapters(path: str | os.PathLike[str], model: nn.Module, config: Mapping[str, Any] | None = None) -> Path:
    """Write the trainable tensors of ``model`` to a safetensors file, atomically; returns the path.

    ``config`` (a JSON-able mapping, or a pydantic model) is stored as a JSON string under the metadata key
    ``"config"``; :func:`load_adapters` returns it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})
    try:
        text = json.dumps(cfg, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ImedsamError(f"save_adapters: config for {path} is not JSON-serialisable ({exc})") from exc
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ImedsamError(f"save_adapters: the model has no trainable parameters to write to {path}")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT,
                                                                          "config": text}))
    logger.info("saved %d adapter tensors (%d values) to %s", len(tensors),
                sum(t.numel() for t in tensors.values()), path)
    return path


def load_adapters(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter file written by :func:`save_adapters`: ``(state_dict on CPU, config dict)``.

    The keys of a first-format file are returned as they were written; :func:`load_adapter_state_dict` renames
    them when it finds them (the renaming needs the model's block list)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ImedsamError(f"adapter file {path} not found; pass the adapter.safetensors of a training run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ImedsamError(f"adapter file {path} is not a readable safetensors file ({exc})") from exc
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as exc:
        raise ImedsamError(f"adapter file {path}: its 'config' metadata is not valid JSON ({exc})") from exc
    return state, config


def migrate_v1_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the keys of a first-format I-MedSAM adapter file to the insertion-point layout.

    Format 1 wrapped the encoder: ``image_encoder.encoder.<path>`` and ``image_encoder.adapters.<i>.*`` (the FA of
    attention block ``i``). Now the encoder is adapted in place: ``image_encoder.<path>`` and
    ``image_encoder.<block i's path>.mlp_parallel.frequency.*``.
    """
    from imedsam.peft.backbone import attention_blocks

    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        return dict(state_dict)
    index = {id(b): i for i, b in enumerate(attention_blocks(encoder))}
    block_path = {index[id(m)]: name for name, m in encoder.named_modules() if id(m) in index}
    out = {}
    for key, value in state_dict.items():
        new = key.replace("image_encoder.encoder.", "image_encoder.", 1)
        m = re.match(r"image_encoder\.adapters\.(\d+)\.(.*)", new)
        if m and int(m.group(1)) in block_path:
            new = f"image_encoder.{block_path[int(m.group(1))]}.mlp_parallel.frequency.{m.group(2)}"
        out[new] = value
    logger.info("adapter file of format %s: %d keys renamed", _V1_FORMAT, sum(k != n for k, n in zip(state_dict, out)))
    return out
