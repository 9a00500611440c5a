"""Segmentation losses on logits (MONAI Dice + a BCE term that is really active for one output channel).

The reference I-MedSAM code used MONAI ``DiceCELoss`` with one output channel under monai 1.1.0, where the CE term
is identically zero (systems.md F-4, MONAI#6923). Here the two terms are composed explicitly, so the BCE term is
active whatever the MONAI version: ``L = w_bce * BCEWithLogits + w_dice * SoftDice(sigmoid)``.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn


class BCEDiceLoss(nn.Module):
    """``w_bce * BCE + w_dice * Dice`` on logits.

    Args:
        bce_weight, dice_weight: the paper's 0.5 / 0.5 by default.
        squared_pred: Dice with squared probabilities in the denominator (the reference code's variant).
    Inputs: logits and targets of the same shape (B, 1, ...) (grids or sampled points (B, 1, N)); targets in
    {0, 1}. Dice is computed per sample and averaged over the batch.
    """

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5, squared_pred: bool = False) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, squared_pred=squared_pred, reduction="mean")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = targets.float()
        return self.bce_weight * self.bce(logits, targets) + self.dice_weight * self.dice(logits, targets)


def coarse_weight(epoch: int, warm_epochs: int) -> float:
    """Weight of the coarse term at 0-based ``epoch``: linear decay 1 - (e+1)/warm to 0 (reference: warm = 5).

    The total loss is ``coarse_weight * L(coarse) + (1 - coarse_weight) * L(fine)``; ``warm_epochs = 0`` trains
    the fine output only.
    """
    if warm_epochs <= 0:
        return 0.0
    return max(0.0, 1.0 - (epoch + 1) / warm_epochs)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet), mean over every pixel: ``-a m (1-p)^g log p - (1-a)(1-m) p^g log(1-p)``.

    ``logits`` and ``targets`` (N, 1, H, W) (or any equal shapes), targets in {0, 1}. Computed from the logits
    (``binary_cross_entropy_with_logits``) so it is stable where ``p`` saturates.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * ce * (1 - p_t) ** gamma).mean()


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p m) + s) / (sum(p) + sum(m) + s)`` per mask (first axis), averaged over the masks
    (SAM-Med2D's Dice summed over the whole batch, systems.md §F.26, is not reproduced)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    m = targets.float().flatten(1)
    return (1 - (2 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)).mean()


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU per mask (first axis) of the thresholded prediction (logit > 0) and the target; 1 when both are
    empty. No gradient: it is the regression target of the IoU head."""
    with torch.no_grad():
        pred = (logits > 0).flatten(1)
        gt = targets.flatten(1) > 0.5
        inter = (pred & gt).sum(1).float()
        union = (pred | gt).sum(1).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
