"""Named insertion points of the image encoders, and the per-forward context they share.

Nothing here knows any particular adapter. Every transformer block of :class:`~imedsam.sam.vit.ImageEncoderViT`
and :class:`~imedsam.sam.tiny_vit.TinyViT` exposes the same points, in this forward order::

    x = x + sum(a(x, ctx) for a in pre_attn)          "pre_attn":     tokens as the block receives them
    x = x + attention(x)                              "qkv":          attn.qkv is a replaceable module
    x = x + sum(a(x, ctx) for a in post_attn)         "post_attn":    after the attention residual
    (TinyViT only: x = local_conv(x))
    h = norm2(x)                                      (TinyViT: the MLP's own pre-norm, mlp.norm)
    x = x + mlp(h) + sum(a(h, ctx) for a in mlp_parallel)   "mlp_parallel": parallel to the MLP, sharing its norm

* ``pre_attn``, ``post_attn`` and ``mlp_parallel`` are :class:`AdapterSlot` (a ``ModuleDict``): an adapter is
  attached by name (``block.mlp_parallel["frequency"] = module``) and must map ``(tokens, ctx)`` to an additive
  update of the tokens' shape. Empty slots cost nothing and hold no parameters, so an official checkpoint loads
  strictly into an encoder before any adapter is attached.
* ``qkv``: ``block.attn.qkv`` is a fused ``nn.Linear``; an adapter replaces it by a module with the same input
  and output (e.g. the frozen Linear plus low-rank updates). The columns of q, k and v for every head are given
  by ``block.attn.qkv_channel_index(part)`` (contiguous ``[q | k | v]`` in the ViT, interleaved per head in TinyViT).

Token layouts at the slots: ViT ``(N, H, W, C)`` channels-last; TinyViT ``(N, H * W, C)`` row-major with
``(H, W) = block.input_resolution``. ``N`` is the number of encoder images: ``B * ctx.num_slices`` when the
encoder sees B stacks of D adjacent slices, slice index inner (image ``n`` is slice ``n % D`` of stack
``n // D``).

Encoder level: ``encoder.streams`` (a ``ModuleDict``) holds side streams that run beside the tokens (I-MedSAM's
frequency stream). At the start of each forward the encoder calls ``stream.begin(encoder, images, ctx)``, with
the validated input, and TinyViT calls ``stream.follow(merge, ctx)`` after each stage's frozen ``PatchMerging``
``merge``, so a stream can keep the grid and width of the tokens; adapters in the slots read and write the
stream's state in ``ctx.state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["AdapterSlot", "EncoderContext", "SLOT_NAMES", "add_slots", "new_context"]

#: The per-block slots, in forward order.
SLOT_NAMES: tuple[str, ...] = ("pre_attn", "post_attn", "mlp_parallel")


@dataclass
class EncoderContext:
    """What one encoder forward shares with its slots and streams.

    Attributes:
        images: the ``(N, C, S, S)`` encoder input.
        valid_hw: the un-padded ``(h, w)`` of the images inside ``S x S`` (top-left), one for all or one per
            image; ``None`` = the whole input.
        num_slices: ``D``, adjacent slices per stack (1 for 2D images); ``N`` is a multiple of it.
        state: per-forward scratch space of streams and adapters (e.g. the frequency tokens), keyed by name.
    """

    images: torch.Tensor
    valid_hw: Any = None
    num_slices: int = 1
    state: dict[str, Any] = field(default_factory=dict)


class AdapterSlot(nn.ModuleDict):
    """One named insertion point of a block: adapters by name, each ``(tokens, ctx) -> additive update``."""

    def residual(self, x: torch.Tensor, ctx: EncoderContext | None) -> torch.Tensor:
        """``x + sum(a(x, ctx))``: the slots before and after attention."""
        for adapter in self.values():
            x = x + adapter(x, ctx)
        return x

    def parallel(self, y: torch.Tensor, h: torch.Tensor, ctx: EncoderContext | None) -> torch.Tensor:
        """``y + sum(a(h, ctx))``: adapters that run beside a branch ``y`` on that branch's input ``h``."""
        for adapter in self.values():
            y = y + adapter(h, ctx)
        return y


def add_slots(block: nn.Module) -> None:
    """Give ``block`` its three empty slots (called by the blocks' constructors)."""
    for name in SLOT_NAMES:
        block.add_module(name, AdapterSlot())


def new_context(images: torch.Tensor, valid_hw: Any = None, num_slices: int = 1) -> EncoderContext:
    """The context of one forward; checks that the batch holds whole stacks."""
    d = int(num_slices)
    if d < 1 or images.shape[0] % d:
        raise ImedsamError(f"encoder input has {images.shape[0]} images, not a whole number of stacks of "
                           f"num_slices={num_slices} adjacent slices")
    return EncoderContext(images=images, valid_hw=valid_hw, num_slices=d)
