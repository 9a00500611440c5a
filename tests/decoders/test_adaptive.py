"""Adaptive grid decoding: exact near the decision boundary, interpolated elsewhere, far fewer evaluations."""

from __future__ import annotations

import torch
from torch import nn

from imedsam.decoders.implicit import ImplicitDecoder, ImplicitDecoderConfig

TINY = dict(coarse_hidden=(32, 16), coarse_feature_dim=6, fine_hidden=(16, 12, 8), mc_samples=4, topk_ratio=0.1)


def disc_decoder(**overrides) -> tuple[ImplicitDecoder, torch.Tensor, torch.Tensor]:
    """A decoder whose logits depend on a smooth radial feature only (encoding and PE weights zeroed), so its
    decision boundaries are circles; returns the model (eval) and its (U, PE) inputs."""
    torch.manual_seed(0)
    model = ImplicitDecoder(ImplicitDecoderConfig(**{**TINY, **overrides}), feature_dim=4, prompt_dim=4)
    first = model.coarse_trunk[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight[:, 1:].zero_()  # only channel 0 of U reaches the coarse trunk
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    feats = torch.zeros(1, 4, 32, 32)
    feats[0, 0] = 10 * (0.6 - (ys**2 + xs**2).sqrt())
    pe = torch.zeros(1, 4, 4, 4)
    model.eval()
    with torch.no_grad():  # move the decision level to the median logit: a boundary inside the grid
        logits = model(feats, pe, size=(64, 64)).coarse_logits
        model.coarse_heads[0].bias[0] -= logits.median()
    return model, feats, pe


class CountPoints:
    """Counts the points that go through the coarse trunk (pass 1 and pass 2)."""

    def __init__(self, model: ImplicitDecoder) -> None:
        self.n = 0
        original = model._trunk_fast

        def counted(table, pts, *args, **kwargs):
            self.n += len(pts)
            return original(table, pts, *args, **kwargs)

        model._trunk_fast = counted  # type: ignore[method-assign]


def test_stride_is_half_the_upsampling_factor():
    assert ImplicitDecoder.adaptive_stride((256, 256), (32, 32)) == 4
    assert ImplicitDecoder.adaptive_stride((384, 384), (96, 96)) == 2
    assert ImplicitDecoder.adaptive_stride((20, 300), (16, 16)) == 1  # not 4x finer along y: exact


def test_adaptive_matches_exact_on_smooth_boundaries_with_few_evaluations():
    model, feats, pe = disc_decoder()
    exact = model(feats, pe, size=(256, 256), seed=3)
    model.config.adaptive = True
    counter = CountPoints(model)
    fast = model(feats, pe, size=(256, 256), seed=3)
    coarse_sign = (fast.coarse_logits > 0) == (exact.coarse_logits > 0)
    assert 0 < int((exact.coarse_logits > 0).sum()) < 256 * 256  # a real boundary inside the grid
    assert coarse_sign.float().mean() > 0.999
    assert ((fast.fine_logits > 0) == (exact.fine_logits > 0)).float().mean() > 0.995
    # pass 1 on the lattice + boundary cells, pass 2 on the selected 10 %: exact needs 1.1 x N
    assert counter.n < 0.4 * 256 * 256
    # where pass 1 ran exactly (the lattice at least), the values are the exact ones
    torch.testing.assert_close(fast.coarse_logits[..., ::4, ::4], exact.coarse_logits[..., ::4, ::4])


def test_prior_steers_the_exact_region():
    model, feats, pe = disc_decoder(adaptive=True)
    counter = CountPoints(model)
    lattice = 65 * 65  # rows/cols 0, 4, ..., 252 plus 255
    model(feats, pe, size=(256, 256), seed=3, prior_logits=torch.full((1, 1, 4, 4), 1e4))
    refined = int(0.1 * 256 * 256)
    assert counter.n <= lattice + refined  # a decided prior: no boundary cell, only the lattice (+ pass 2)


def test_adaptive_is_exact_when_the_grid_is_not_finer_and_shapes_hold_for_odd_grids():
    model, feats, pe = disc_decoder()
    exact = model(feats, pe, size=(40, 40), seed=1)
    model.config.adaptive = True
    same = model(feats, pe, size=(40, 40), seed=1)  # stride 1
    torch.testing.assert_close(same.fine_logits, exact.fine_logits)
    for size in [(1, 1), (67, 131), (129, 64)]:
        out = model(feats, pe, size=size, seed=1)
        assert out.fine_logits.shape == (1, 1, *size)
        assert out.uncertainty is not None and torch.isfinite(out.uncertainty).all()
