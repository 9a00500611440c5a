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
