"""SAM-Med2D's objective: a box or point pass, then decoder-only passes prompted from the error (systems.md §B.3,
with the §B.8 fixes).

Per batch of B images with M object masks each (``masks_per_image``; the image embedding is computed once and
shared by its M prompts):

1. **First pass.** With probability ``box_probability`` the whole batch is prompted with boxes (the dataset's
   training boxes: largest component, shifted), otherwise with ``n`` random points per mask, ``n`` drawn from
   ``first_points`` (SAM-Med2D: always 1, one foreground pixel; ``n > 1`` draws ``n // 2`` foreground and the rest
   background pixels, as the ``points:N`` test protocol). Encoder (adapters) + prompt encoder + mask decoder;
   loss; optimizer step.
2. **Decoder-only passes** (``iterations``, default 8), on the detached embedding (the encoder does not change
   within the batch): before each, ``n`` points (``n`` drawn from ``point_choices`` = 1, 3, 5, 9) are sampled
   uniformly, with replacement, from the error region ``prediction != ground truth`` of the previous pass, label 1
   on false negatives and 0 on false positives (a mask without error gets padding points, label -1); they
   **replace** the previous points, boxes are dropped, and the previous pass's low-resolution **logits** are the
   mask prompt. At one random pass among the 2nd..(N-1)th and at the last, the prompt is the mask alone.
   Each pass: loss; optimizer step (``step_per_pass: false`` sums the passes' losses into one step instead).

Gradients reach the prompt encoder in every pass, the mask-prompt branch included (the official code froze it in
these passes, §F.24). Loss per pass, per mask then averaged (§F.26 fixed):
``focal_weight * focal + dice_weight * Dice + iou_weight * MSE(predicted IoU, IoU of the thresholded mask)``
(20 / 1 / 1), on the chosen mask (best predicted IoU of 3 with ``model.multimask_output``) upsampled to the
training grid. Random choices come from generators seeded by ``(seed, step)``; a process of a multi-process run
draws the clicks of the global batch's shape (its rows in place, the others blank) and keeps its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imedsam.models.base import Prompts
from imedsam.train.losses import dice_loss_per_mask, focal_loss, mask_iou
from imedsam.train.objectives.base import Objective
from imedsam.train.shards import Shard


class IterativeClickSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    masks_per_image: int = Field(5, ge=1, description="object masks drawn per image (with replacement) per step")
    box_probability: float = Field(0.5, ge=0, le=1, description="first pass prompted by boxes (else points)")
    first_points: tuple[int, ...] = Field((1,), min_length=1, description="points of a point-prompted first pass, "
                                                                         "drawn per batch from this list (1: one "
                                                                         "foreground; n: n//2 fg + rest bg)")
    iterations: int = Field(8, ge=0, description="decoder-only passes after the first")
    point_choices: tuple[int, ...] = Field((1, 3, 5, 9), min_length=1, description="points per decoder-only pass")
    mask_only_passes: bool = Field(True, description="one random middle pass and the last take the mask prompt "
                                                     "alone")
    step_per_pass: bool = Field(True, description="an optimizer step after every pass (SAM-Med2D); false: one "
                                                  "step with the sum of the passes' losses")
    focal_weight: float = Field(20.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)

    @field_validator("point_choices", "first_points")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if min(v) < 1:
            raise ValueError(f"{list(v)}: every choice must be >= 1")
        return v


def error_points(pred: torch.Tensor, gt: torch.Tensor, n: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clicks per mask sampled uniformly with replacement from ``pred != gt``.

    Args:
        pred, gt: (N, H, W) bool.
    Returns:
        points (N, n, 2) float xy pixel indices; labels (N, n) int64: 1 on a false negative, 0 on a false
        positive, -1 (padding, anywhere) for a mask without error.
    """
    error = (pred != gt).flatten(1)
    has_error = error.any(dim=1)
    weights = torch.where(has_error[:, None], error.float(), torch.ones_like(error, dtype=torch.float32))
    idx = torch.multinomial(weights.cpu(), n, replacement=True, generator=generator).to(pred.device)
    w = pred.shape[-1]
    points = torch.stack([idx % w, idx // w], dim=-1).float()
    labels = torch.gather(gt.flatten(1), 1, idx).long()
    labels = torch.where(has_error[:, None], labels, torch.full_like(labels, -1))
    return points, labels


def _pixels(region: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pixels per row of ``region`` (N, H, W) bool, uniformly with replacement (anywhere for an empty row):
    (N, n, 2) xy and the (N,) emptiness."""
    flat = region.flatten(1)
    empty = ~flat.any(dim=1)
    weights = torch.where(empty[:, None], torch.ones_like(flat, dtype=torch.float32), flat.float())
    idx = torch.multinomial(weights.cpu(), n, replacement=True, generator=generator).to(region.device)
    w = region.shape[-1]
    return torch.stack([idx % w, idx // w], dim=-1).float(), empty


def foreground_points(gt: torch.Tensor, generator: torch.Generator, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random points per mask as the ``points:N`` test: ``n = 1`` one foreground pixel, ``n > 1`` ``n // 2``
    foreground then the rest background. Points (N, n, 2) xy, labels (N, n); a missing region (an empty mask, a
    full one) gives label 0 and 1 pixels anywhere, as SAM-Med2D does for empty masks."""
    n_fg = 1 if n == 1 else n // 2
    fg, no_fg = _pixels(gt, n_fg, generator)
    labels = [torch.where(no_fg[:, None], 0, 1).expand(-1, n_fg)]
    points = [fg]
    if n > n_fg:
        bg, no_bg = _pixels(~gt, n - n_fg, generator)
        points.append(bg)
        labels.append(torch.where(no_bg[:, None], 1, 0).expand(-1, n - n_fg))
    return torch.cat(points, 1), torch.cat(labels, 1).long()


def _per_part(shard: Shard | None, per_item: int, draw, *args):
    """``draw(*tensors, *rest)`` (:func:`foreground_points`, :func:`error_points`: the mask tensors first, then
    ints and the generator) for this process's rows: in a multi-process run made on the global batch's shape
    with these rows in place (the amount drawn depends only on the shape) and sliced back."""
    if shard is None:
        return draw(*args)
    args = tuple(shard.embed(a, per_item) if isinstance(a, torch.Tensor) else a for a in args)
    return tuple(shard.take(out, per_item) for out in draw(*args))


class IterativeClickObjective(Objective):
    Config = IterativeClickSettings

    def loss(self, low_res: torch.Tensor, iou_pred: torch.Tensor, masks: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Loss of the chosen masks ``(N, 1, 4h, 4w)`` and their predicted IoU ``(N, 1)`` against ``masks``
        ``(N, S, S)``; also returns the upsampled logits ``(N, 1, S, S)`` (detached)."""
        s = self.settings
        logits = F.interpolate(low_res.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        target = masks[:, None]
        focal = focal_loss(logits, target)
        dice = dice_loss_per_mask(logits, target)
        iou_true = mask_iou(logits, target)
        iou_mse = F.mse_loss(iou_pred.float()[:, 0], iou_true)
        loss = s.focal_weight * focal + s.dice_weight * dice + s.iou_weight * iou_mse
        return loss, logits.detach(), {"focal": float(focal.detach()), "dice_loss": float(dice.detach()),
                                      "iou_mse": float(iou_mse.detach())}

    def steps(self, batch: dict[str, Any], *, epoch: int, step: int,
              shard: Shard | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        s = self.settings
        seed = self.config.run.seed
        rng = np.random.default_rng([seed, step, 0xC11C])
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images = self.images(batch)
        masks = batch["masks"].to(self.device).float()  # (B, M, S, S)
        b, m = masks.shape[:2]
        masks = masks.flatten(0, 1)  # (B*M, S, S), image-major
        gt = masks > 0.5
        use_box = bool(rng.random() < s.box_probability)
        with self.autocast():
            embeddings = self.system.encode(images).repeat_interleave(m, dim=0)
            if use_box:
                prompts = Prompts(boxes=batch["boxes"].to(self.device).float().flatten(0, 1))
            else:
                pts, lab = _per_part(shard, m, foreground_points, gt, gen, int(rng.choice(s.first_points)))
                prompts = Prompts(points=pts, labels=lab)
            low_res, iou, _, _ = self.system.predict_low_res(embeddings, prompts)
        loss, logits, logs = self.loss(low_res, iou, masks)
        if shard is not None:  # the loss terms are means over the masks: this part's share
            loss = loss * shard.weight
        total = loss
        if s.step_per_pass or s.iterations == 0:
            yield loss, {"pass": 0, "prompt": "box" if use_box else "point", **logs}
        embeddings = embeddings.detach()
        mask_only = {s.iterations - 1}
        if s.mask_only_passes and s.iterations >= 3:
            mask_only.add(int(rng.integers(1, s.iterations - 1)))
        elif not s.mask_only_passes:
            mask_only = set()
        prev = low_res.detach()
        for it in range(s.iterations):
            with self.autocast():
                if it in mask_only:
                    prompts = Prompts(mask_input=prev)
                else:
                    n = int(rng.choice(s.point_choices))
                    pts, lab = _per_part(shard, m, error_points, logits[:, 0] > 0, gt, n, gen)
                    prompts = Prompts(points=pts, labels=lab, mask_input=prev)
                low_res, iou, _, _ = self.system.predict_low_res(embeddings, prompts)
            loss, logits, logs = self.loss(low_res, iou, masks)
            if shard is not None:
                loss = loss * shard.weight
            prev = low_res.detach()
            if s.step_per_pass:
                yield loss, {"pass": it + 1, **logs}
            else:
                total = total + loss
        if not s.step_per_pass and s.iterations:
            yield total / (s.iterations + 1), {"passes": s.iterations + 1}
