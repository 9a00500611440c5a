"""What the adapters need to know about a backbone: its attention blocks, their widths and grids, and freezing.

Both encoders (:class:`~imedsam.sam.vit.ImageEncoderViT`, :class:`~imedsam.sam.tiny_vit.TinyViT`) expose the
same insertion points (:mod:`imedsam.sam.insertion`); this module lists the blocks that carry them:

* ViT: ``encoder.blocks`` (all of them);
* TinyViT: the blocks of ``layers[1]``, ``layers[2]``, ``layers[3]`` in order (stage 0 is MBConv, without
  attention and without slots).

"Block index" everywhere in :mod:`imedsam.peft` means the index in this flat list.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["attention_blocks", "block_grid", "block_width", "encoder_kind", "freeze_backbone"]


def encoder_kind(encoder: nn.Module) -> str:
    """``"vit"`` or ``"tiny_vit"``; anything else is a user error."""
    from imedsam.sam.tiny_vit import TinyViT
    from imedsam.sam.vit import ImageEncoderViT

    if isinstance(encoder, ImageEncoderViT):
        return "vit"
    if isinstance(encoder, TinyViT):
        return "tiny_vit"
    raise ImedsamError(f"adapters attach to ImageEncoderViT and TinyViT encoders, got {type(encoder).__name__}")


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The attention blocks in order: ViT ``blocks``; TinyViT the blocks of ``layers[1:]``."""
    if encoder_kind(encoder) == "vit":
        return list(encoder.blocks)
    return [block for layer in list(encoder.layers)[1:] for block in layer.blocks]


def block_width(block: nn.Module) -> int:
    """Token width C of a block."""
    qkv = block.attn.qkv
    return int(getattr(qkv, "in_features"))


def block_grid(block: nn.Module, encoder: nn.Module) -> tuple[int, int]:
    """Token grid (H, W) of a block: TinyViT ``input_resolution``, ViT the encoder's grid."""
    if hasattr(block, "input_resolution"):
        return tuple(block.input_resolution)  # type: ignore[return-value]
    g = encoder.grid_size
    return (g, g)


def _pin_batchnorm_eval(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook: a frozen BatchNorm always normalises with its running statistics and never updates them."""
    module.training = False


def freeze_backbone(encoder: nn.Module) -> None:
    """Freeze every parameter of ``encoder`` and pin its BatchNorm layers (TinyViT) to evaluation behaviour
    (running statistics, never updated, in ``train()`` mode too), so the frozen encoder never drifts and an
    adapter file alone describes what was trained. Refuses an encoder that already carries adapters."""
    encoder_kind(encoder)
    if any(len(slot) for block in attention_blocks(encoder)
           for slot in (block.pre_attn, block.post_attn, block.mlp_parallel)) or len(encoder.streams) \
            or any(not isinstance(block.attn.qkv, nn.Linear) for block in attention_blocks(encoder)):
        raise ImedsamError("adapters: this encoder already has adapters; attach them to a fresh backbone")
    encoder.requires_grad_(False)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_pin_batchnorm_eval)
