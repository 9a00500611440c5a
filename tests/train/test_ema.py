"""The exponential moving average of the trainable weights."""

import pytest
import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.train.ema import ParameterEMA


def test_average_follows_the_formula_and_swaps_in_and_out():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    ema = ParameterEMA(model, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.bias"]
    start = [p.detach().clone() for p in ema.params]
    expected = [s.clone() for s in start]
    for t in range(3):
        with torch.no_grad():
            for p in ema.params:
                p.add_(1.0)
        d = min(0.9, (1 + t) / (10 + t))
        expected = [e + (1 - d) * (p.detach() - e) for e, p in zip(expected, ema.params)]
        ema.update()
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e)
    raw = [p.detach().clone() for p in ema.params]
    with ema.applied():
        for p, s in zip(ema.params, ema.shadow):
            torch.testing.assert_close(p.detach(), s)
    for p, r in zip(ema.params, raw):
        assert torch.equal(p.detach(), r)
    other = ParameterEMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 3 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_out_of_range_is_a_user_error(decay):
    with pytest.raises(ImedsamError, match="ema_decay"):
        ParameterEMA(nn.Linear(2, 2), decay)
