"""Exponential moving average (EMA) of the trainable parameters, validated and saved in their place.

After every optimizer step ``ema = ema + (1 - d_t) (param - ema)`` with ``d_t = min(decay, (1 + t) / (10 + t))``
(t = steps so far: early steps follow the weights closely instead of staying near the initialisation). Buffers
(BatchNorm running statistics) are already running averages and are used as they are. Validation and the ``best``
checkpoint use the averaged parameters (:meth:`ParameterEMA.applied`); the raw parameters go on training and
are what ``adapter.safetensors`` and ``--resume`` hold, with the average kept in ``train_state.pt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from imedsam.errors import ImedsamError


class ParameterEMA:
    """EMA of ``model``'s parameters that require grad.

    Args:
        model: the model being trained.
        decay: the long-run decay ``d`` in (0, 1), e.g. 0.98 (a horizon of about 50 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ImedsamError(f"optim.ema_decay={decay!r}: use a value in (0, 1), e.g. 0.98, or null to disable")
        self.decay = float(decay)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (call after each optimizer step)."""
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.steps += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged parameters; the raw ones are restored afterwards."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ImedsamError(f"train_state.pt: the saved EMA lacks {sorted(missing)[:3]}; was the run trained "
                               f"with another model config?")
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                s.copy_(state["shadow"][name])
        self.steps = int(state["steps"])
