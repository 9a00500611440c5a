import torch

from imedsam.train.losses import BCEDiceLoss, coarse_weight


def test_bce_term_is_active_for_one_channel():
    target = torch.zeros(2, 1, 50)
    target[:, :, :25] = 1
    logits = torch.where(target > 0, 3.0, -3.0)
    only_bce = BCEDiceLoss(bce_weight=1.0, dice_weight=0.0)(logits, target)
    expected = torch.nn.functional.softplus(torch.tensor(-3.0))  # -log(sigmoid(3))
    assert torch.isclose(only_bce, expected, atol=1e-5)
    # stronger logits lower the BCE while Dice barely moves: the CE term is really there
    assert BCEDiceLoss()(logits * 3, target) < BCEDiceLoss()(logits, target)


def test_dice_term_matches_hand_value():
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    logits = torch.tensor([[[20.0, -20.0, -20.0, -20.0]]])  # p = (1, 0, 0, 0)
    dice = BCEDiceLoss(bce_weight=0.0, dice_weight=1.0)(logits, target)
    assert torch.isclose(dice, torch.tensor(1 - 2 * 1 / 3), atol=1e-3)


def test_coarse_weight_schedule():
    assert [round(coarse_weight(e, 5), 2) for e in range(6)] == [0.8, 0.6, 0.4, 0.2, 0.0, 0.0]
    assert coarse_weight(0, 0) == 0.0
