"""Adaptive grid decoding of the implicit decoder (``config.adaptive``, inference on output grids at least 4x
finer than the decoder features): pass 1 on a lattice of every s-th pixel, exactly only in the lattice cells where
the decision changes sign (and their edge neighbours), interpolated elsewhere (module docstring of
:mod:`imedsam.decoders.implicit`). :class:`AdaptiveGrid` is a mixin of the decoder.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from imedsam.decoders.coords import (
    flat_index_coords,
    sample_features,
)

logger = logging.getLogger("imedsam.decoders.implicit")


class AdaptiveGrid:
    """Adaptive pass 1 of :class:`~imedsam.decoders.implicit.ImplicitDecoder` (module docstring)."""

    @staticmethod
    def adaptive_stride(size: tuple[int, int], hw_u: tuple[int, int]) -> int:
        """Lattice stride of adaptive decoding: half the output pixels per U pixel (1 = decode exactly)."""
        return max(1, min(size[0] // hw_u[0], size[1] // hw_u[1]) // 2)

    @staticmethod
    def _lattice(length: int, stride: int, device: torch.device) -> torch.Tensor:
        """Every ``stride``-th index of ``range(length)`` plus the last one."""
        pos = torch.arange(0, length, stride, device=device)
        if int(pos[-1]) != length - 1:
            pos = torch.cat((pos, torch.tensor([length - 1], device=device)))
        return pos

    @staticmethod
    def _interp_matrix(pos: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(length, len(pos)) linear interpolation weights from lattice ``pos`` to every index, and the lattice
        cell (left lattice index, in [0, len(pos) - 2]) of every index."""
        i = torch.arange(length, device=pos.device)
        cell = (torch.searchsorted(pos, i, right=True) - 1).clamp(0, max(len(pos) - 2, 0))
        if len(pos) == 1:
            return torch.ones(length, 1, device=pos.device), cell
        left, right = pos[cell], pos[cell + 1]
        t = (i - left).float() / (right - left).float()
        m = torch.zeros(length, len(pos), device=pos.device)
        m[i, cell] = 1 - t
        m[i, cell + 1] += t
        return m, cell

    def _adaptive_pass1(self, pass1, size: tuple[int, int], stride: int, bi: int, coarse: torch.Tensor,
                        uncertainty: torch.Tensor | None, prior: torch.Tensor | None) -> None:
        """Adaptive pass 1 for image ``bi`` (see the module docstring); fills ``coarse`` and ``uncertainty``."""
        hh, ww = size
        dev = coarse.device
        c_cls = coarse.shape[1]
        ry, rx = self._lattice(hh, stride, dev), self._lattice(ww, stride, dev)
        lattice = (ry[:, None] * ww + rx[None, :]).reshape(-1)
        pass1(lattice)
        my, cell_y = self._interp_matrix(ry, hh)
        mx, cell_x = self._interp_matrix(rx, ww)
        shape_l = (c_cls, len(ry), len(rx))
        logit_l = coarse[bi][:, lattice].reshape(shape_l)
        decision = logit_l
        if prior is not None:
            at = flat_index_coords(lattice, hh, ww)
            decision = logit_l + sample_features(prior[None].float(), at[None])[0].t().reshape(shape_l)
        # cells whose corners disagree on the sign, for any class, and their 4 edge neighbours
        pos = (decision > 0).float()
        if len(ry) > 1 and len(rx) > 1:
            mixed = (F.max_pool2d(pos, 2, stride=1) != -F.max_pool2d(-pos, 2, stride=1)).any(0, keepdim=True)
        else:
            mixed = torch.ones(1, max(len(ry) - 1, 1), max(len(rx) - 1, 1), dtype=torch.bool, device=dev)
        cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=dev).view(1, 1, 3, 3)
        mixed = F.conv2d(mixed.float()[None], cross, padding=1)[0, 0] > 0
        exact = mixed[cell_y][:, cell_x].reshape(-1)
        exact[lattice] = False
        coarse[bi] = (my @ logit_l @ mx.t()).reshape(c_cls, -1)
        if uncertainty is not None:
            unc_l = uncertainty[bi][:, lattice].reshape(shape_l)
            uncertainty[bi] = (my @ unc_l @ mx.t()).reshape(c_cls, -1)
        pass1(exact.nonzero().squeeze(1))
        logger.debug("adaptive decode %dx%d: stride %d, %.1f%% of pixels evaluated", hh, ww, stride,
                     100.0 * (len(lattice) + int(exact.sum())) / (hh * ww))
