"""MA-SAM's objective: stacks of adjacent slices, every class at once (systems.md §C.6).

Per step: B stacks of D slices (:class:`imedsam.data.stacks.StacksDataset`) go through the encoder together (the
3-D adapters mix the D slices of a stack), the prompt-free multi-class decoder gives ``num_classes + 1`` logits
per slice (the box-prompted variant: each stack's box, ``StacksDataset(box_prompt=True)``, given to all its
slices); the loss is ``ce_weight * CE + dice_weight * Dice`` over all classes and all slices of the batch, the
Dice the mean over classes (background included, as MA-SAM) of the soft Dice of the softmax probabilities,
computed over the whole batch. Logits are resized to the labels' grid (bilinear) first. One optimizer step per
batch. In a multi-process run the Dice sums are added over the processes, so the Dice is the global batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from imedsam.train.objectives.base import Objective
from imedsam.train.shards import Shard


class MulticlassStacksSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ce_weight: float = Field(0.2, ge=0, description="cross-entropy weight (MA-SAM: 0.2)")
    dice_weight: float = Field(0.8, ge=0, description="soft multi-class Dice weight (MA-SAM: 0.8)")
    foreground_prob: float = Field(0.5, ge=0, le=1, description="share of stacks centred on a labelled slice")


def multiclass_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5,
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of ``softmax(logits)`` (N, K, H, W) against int labels (N, H, W).

    ``reduce``: sums the per-class intersections and denominators over the processes of a multi-process run
    first (:meth:`imedsam.train.shards.Shard.all_reduce`), so the Dice is that of the global batch."""
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels, num_classes=logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    if reduce is not None:
        inter, denom = reduce(torch.stack((inter, denom)))
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


class MulticlassStacksObjective(Objective):
    Config = MulticlassStacksSettings
    #: the objective reads stacks of adjacent slices (:class:`imedsam.data.stacks.StacksDataset`)
    items: ClassVar[str] = "stacks"

    def steps(self, batch: dict[str, Any], *, epoch: int, step: int,
              shard: Shard | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        s = self.settings
        images = batch["image"].to(self.device)  # (B, D, 3, S, S) display scale
        b, d = images.shape[:2]
        images = self.system.preprocess.normalize_tensor(images.reshape(b * d, *images.shape[2:]))
        labels = batch["labels"].to(self.device).reshape(b * d, *batch["labels"].shape[2:])
        boxes = batch["box"].to(self.device) if "box" in batch else None  # the box-prompted variant: (B, 4)
        with self.autocast():
            logits = self.system.stack_logits(images.reshape(b, d, *images.shape[1:]), boxes)
        logits = logits.reshape(b * d, *logits.shape[2:]).float()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, labels)
        if shard is None:
            dice = multiclass_dice_loss(logits, labels)
            loss = s.ce_weight * ce + s.dice_weight * dice
        else:  # CE: a mean over the items (this part's share); Dice: of the global batch, the same on every process
            dice = multiclass_dice_loss(logits, labels, reduce=shard.all_reduce)
            loss = s.ce_weight * ce * shard.weight + s.dice_weight * dice / shard.world_size
        yield loss, {"ce": float(ce.detach()), "dice_loss": float(dice.detach())}
