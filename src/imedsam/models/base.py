"""What every assembled system offers the inference, training and evaluation code.

A system owns a backbone (image encoder), a prompt encoder and a decoder. It is asked for logits on a GRID of
the original image (any size), never for "its" resolution: discrete decoders produce native logits and resize
once (:func:`imedsam.sam.prepare.restore_logits`); implicit decoders evaluate the grid directly.

Each system also declares what it accepts (``prompt_types``), whether it answers without a prompt
(``automatic``), how many adjacent slices its encoder sees at once (``stack_depth``), which of its parameters
train and at which learning rate (:meth:`SegmentationSystem.param_groups`), and the protocols validation scores
it on (``val_protocols``); its registry entry (:class:`imedsam.models.spec.SystemSpec`) names its training
objective. The training loop, ``Segmenter`` and the evaluation protocols know no method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.sam.prepare import PreparedImage

PROMPT_TYPES: tuple[str, ...] = ("box", "points", "mask")


@dataclass
class Prompts:
    """Prompts for ONE image, in encoder-input pixel coordinates (see :mod:`imedsam.sam.prepare`).

    Attributes:
        points: (1, N, 2) float xy, or None.
        labels: (1, N) int, 1 foreground / 0 background, or None.
        boxes: (1, 4) float xyxy, or None.
        mask_input: (1, 1, 4h, 4w) logits from a previous prediction (SAM's low-res mask), or None.
    """

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None

    def kinds(self) -> list[str]:
        """The prompt types present, among :data:`PROMPT_TYPES`."""
        present = {"box": self.boxes is not None, "points": self.points is not None,
                   "mask": self.mask_input is not None}
        return [k for k in PROMPT_TYPES if present[k]]


@dataclass
class DecodeResult:
    """Decoder output for one image.

    Attributes:
        logits: (1, K, H_o, W_o) float32 logits on the requested grid of the original image (K masks).
        scores: (1, K) predicted IoU (SAM) or mean confidence (implicit decoder) per mask.
        low_res_logits: (1, K, 4h, 4w) logits usable as the next ``mask_input``; None for implicit decoders.
        uncertainty: (1, 1, H_o, W_o) per-pixel uncertainty (variance of MC-dropout probabilities) or None.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    low_res_logits: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None


class SegmentationSystem(nn.Module):
    """Base class: ``encode`` once per image, ``decode`` per prompt set.

    Subclasses set ``config`` (their typed config), ``preprocess`` (an :class:`imedsam.sam.model.Preprocess`) and
    the class attributes below.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: prompt types the decoder uses (subset of :data:`PROMPT_TYPES`); empty for prompt-free systems
    prompt_types: ClassVar[frozenset[str]] = frozenset()
    #: answers without any prompt (prompt-free decoders) -- promptable systems are automatic through a grid of
    #: point prompts instead (:mod:`imedsam.infer.automatic`)
    prompt_free: ClassVar[bool] = False
    #: adjacent slices the encoder sees at once (1: 2D images)
    stack_depth: ClassVar[int] = 1
    #: the decoder can return an uncertainty map
    has_uncertainty: ClassVar[bool] = False
    #: the evaluation protocols validation averages (:mod:`imedsam.data.interaction`), e.g. ("box", "points:1")
    val_protocols: ClassVar[tuple[str, ...]] = ("box",)
    #: submodules a training forward runs on a data-dependent part of the batch, or skips: their BatchNorm keeps
    #: per-process statistics in multi-process training (:func:`imedsam.train.sync.global_batchnorm`)
    batch_conditional_modules: ClassVar[tuple[str, ...]] = ()

    config: Any = None
    preprocess = None

    @classmethod
    def prompts_for(cls, config: Any) -> tuple[frozenset[str], bool]:
        """``(prompt_types, prompt_free)`` of the system built from ``config`` (a config-chosen variant, such as
        MA-SAM's box-prompted decoder, may differ from the class's defaults), known without building it."""
        return cls.prompt_types, cls.prompt_free

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, S, S) prepared images -> (B, C, h, w) image embeddings.

        ``valid_hw``: the un-padded (h, w) inside the S x S input, for encoders that must ignore padding.
        """
        raise NotImplementedError

    def encoder_module(self) -> nn.Module:
        """The module :meth:`encode` runs (the image encoder, adapters included): inference may keep its weights
        in another precision than the rest's (:mod:`imedsam.infer.part_precision`)."""
        return self.image_encoder

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        """Decode one image's prompts onto a grid (default: the original size) of the original image."""
        raise NotImplementedError

    def check_prompts(self, kinds: list[str] | tuple[str, ...], argument: str = "prompt") -> None:
        """Refuse, in one line, a prompt type this system cannot use (before any heavy work)."""
        flags = {"box": "--box", "points": "--point", "mask": "--mask-input"}
        unusable = [k for k in kinds if k not in self.prompt_types]
        if unusable:
            usable = ", ".join(flags[k] for k in PROMPT_TYPES if k in self.prompt_types) or "no prompt"
            raise ImedsamError(f"{flags.get(unusable[0], argument)}: model {self.name!r} cannot use a "
                               f"{unusable[0]} prompt; it takes {usable}")

    # ----------------------------------------------------------------- training
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: ``"decoder"`` (``optim.lr_decoder``) and ``"adapters"``
        (``optim.lr_adapter``). Default: everything trainable in ``"adapters"``."""
        return {"adapters": [p for p in self.parameters() if p.requires_grad]}

    # ----------------------------------------------------------------- weights
    def save_trainable(self, path: str | Path, config: dict | None = None) -> Path:
        """Write the trainable tensors + config (``{"model": ...}`` at least) as safetensors, atomically."""
        from imedsam.peft.files import save_adapters

        return save_adapters(path, self, config or {"model": self.config.model_dump(mode="json")})

    def load_trainable(self, path: str | Path) -> None:
        """Load trainable tensors saved by :meth:`save_trainable` (strict: same config)."""
        from imedsam.peft.files import load_adapter_state_dict, load_adapters

        state, _ = load_adapters(path)
        load_adapter_state_dict(self, state, strict=True)


def trainable_breakdown(system: nn.Module, groups: dict[str, Any]) -> dict[str, int]:
    """Trainable parameters per named group: ``groups`` maps a group name to a predicate on parameter names
    (first match wins); unmatched trainable tensors are listed by name. The sum is checked."""
    counts = {name: 0 for name in groups}
    for pname, param in system.named_parameters():
        if not param.requires_grad:
            continue
        for gname, match in groups.items():
            if match(pname):
                counts[gname] += param.numel()
                break
        else:
            counts[pname] = param.numel()
    total = sum(p.numel() for p in system.parameters() if p.requires_grad)
    if total != sum(counts.values()):  # pragma: no cover - a bug in the grouping
        raise AssertionError("every trainable tensor must be in exactly one group")
    return counts
