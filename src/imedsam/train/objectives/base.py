"""The interface between the training loop and a system's way of learning."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from imedsam.runtime import autocast
from imedsam.train.shards import Shard


class Objective:
    """How a system learns from a batch.

    ``steps(batch, epoch=, step=)`` yields ``(loss, logs)`` once per optimizer step: the loop runs backward and
    the optimizer step on each before asking for the next, so a later pass sees the updated weights (SAM-Med2D's
    decoder-only passes). Every random choice derives from ``(config.run.seed, step)``, so a resumed run repeats
    the uninterrupted one exactly.

    In a multi-process run the loop also passes ``shard`` (:class:`imedsam.train.shards.Shard`): ``batch`` is then
    this process's part of the global batch, each yielded loss must be this process's share of the global-batch
    loss (the processes' losses sum to it; the loop sums the gradients), and random draws made for a whole batch
    are made for the global batch and sliced, so that the run trains as one process on the global batch would.
    Single-process runs pass no ``shard``.

    Class attributes: ``Config``, the pydantic model of the ``objective`` config section; ``masks_per_image``
    is read from it when present: the objective then wants :class:`~imedsam.data.objects.ObjectsDataset` items
    (one image, several object masks) instead of one object per item.
    """

    Config: ClassVar[type[BaseModel]]

    def __init__(self, system, config, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.system = system
        self.config = config  # the whole TrainConfig
        self.settings = config.objective
        self.device = device
        self.amp_dtype = amp_dtype

    @property
    def masks_per_image(self) -> int | None:
        return getattr(self.settings, "masks_per_image", None)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's images normalised as the backbone expects, on the device: (B, 3, S, S)."""
        return self.system.preprocess.normalize_tensor(batch["image"].to(self.device))

    def steps(self, batch: dict[str, Any], *, epoch: int, step: int,
              shard: Shard | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        raise NotImplementedError
