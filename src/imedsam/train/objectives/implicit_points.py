"""I-MedSAM's objective: BCE + Dice on the coarse and fine logits of sampled query points (systems.md §A.12).

Per step: ``points_per_image`` query points per image (``boundary_fraction`` of them near the mask boundary,
``box_fraction`` inside the prompt box, the rest uniform), from a generator seeded by ``(seed, step)``; the loss is
``w * L(coarse) + (1 - w) * L(fine)`` with ``w`` decaying linearly to 0 over ``coarse_warm_epochs`` epochs and
``L = bce_weight * BCE + dice_weight * Dice`` (the BCE term really active, §F.4). One optimizer step per batch.
A process of a multi-process run draws the points of the global batch (its masks gathered) and keeps its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imedsam.decoders.implicit import sample_training_points
from imedsam.train.losses import BCEDiceLoss, coarse_weight
from imedsam.train.objectives.base import Objective
from imedsam.train.shards import Shard


class ImplicitPointsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coarse_warm_epochs: int = Field(5, ge=0, description="coarse-loss weight decays linearly to 0 over these")
    points_per_image: int = Field(4096, ge=1, description="query points sampled per image and step")
    boundary_fraction: float = Field(0.5, ge=0, le=1, description="share of points drawn near mask boundaries")
    box_fraction: float = Field(0.0, ge=0, le=1, description="share of points drawn inside the prompt box "
                                                             "(at most 1 - boundary_fraction)")
    bce_weight: float = Field(0.5, ge=0)
    dice_weight: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _point_shares(self) -> ImplicitPointsSettings:
        if self.boundary_fraction + self.box_fraction > 1:
            raise ValueError(f"boundary_fraction + box_fraction = {self.boundary_fraction + self.box_fraction} "
                             "exceeds 1; lower one of them")
        return self


class ImplicitPointsObjective(Objective):
    Config = ImplicitPointsSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.criterion = BCEDiceLoss(self.settings.bce_weight, self.settings.dice_weight)

    def steps(self, batch: dict[str, Any], *, epoch: int, step: int,
              shard: Shard | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        s = self.settings
        points_gen = torch.Generator().manual_seed(self.config.run.seed * 1_000_003 + step)
        images = self.images(batch)
        masks = batch["mask"].to(self.device).float()
        boxes = batch["box"].to(self.device).float()
        points = None
        if shard is not None:  # the global batch's points (their draws depend on the masks), this part's rows
            every_box = shard.gather(boxes) if s.box_fraction > 0 else None
            coords, targets = sample_training_points(shard.gather(masks), s.points_per_image, s.boundary_fraction,
                                                     generator=points_gen, boxes=every_box,
                                                     box_fraction=s.box_fraction)
            points = shard.take(coords), shard.take(targets)
        with self.autocast():
            coarse, fine, targets = self.system.forward_train(
                images, boxes, masks, n_points=s.points_per_image, boundary_fraction=s.boundary_fraction,
                box_fraction=s.box_fraction, generator=points_gen, points=points)
        w = coarse_weight(epoch, s.coarse_warm_epochs)
        loss = w * self.criterion(coarse, targets) + (1 - w) * self.criterion(fine, targets)
        if shard is not None:  # BCE and Dice are means over the items: this part's share
            loss = loss * shard.weight
        yield loss, {"coarse_weight": w}
