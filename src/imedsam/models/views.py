"""Flip test-time augmentation: predict on flipped copies of the image, flip the logits back, average them.

A flip maps the original grid onto itself (column ``j`` <-> ``W - 1 - j``; continuous ``x`` <-> ``W - x``), so
prompts follow exactly: a half-open box ``[x0, x1)`` becomes ``[W - x1, W - x0)`` and a point at pixel ``x``
(SAM adds the 0.5 of the pixel centre) becomes ``W - 1 - x``; likewise for rows. Any output grid's pixel centres are
symmetric about the image centre, so a flipped view's logits on that grid flip back exactly onto it.

Each view is encoded separately (the image changes), so ``k`` flips cost ``k + 1`` encoder passes. The views'
logits are averaged (not their probabilities) and thresholded at 0 as usual; uncertainty maps are averaged too.
The default is no augmentation; ``h,v`` (identity + horizontal + vertical) was chosen on Kvasir-Sessile ``val``
(README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imedsam.errors import ImedsamError
from imedsam.sam.prepare import PreparedImage, prepare_image, to_input_coords
from imedsam.models.base import Prompts

_AXES = {"h": (1,), "v": (0,), "hv": (0, 1)}  # flipped array axes: 0 = rows (vertical flip), 1 = columns


@dataclass(frozen=True)
class FlipView:
    """One view of an image: the array axes it flips (``()``: the image itself; 0: rows; 1: columns)."""

    axes: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return {(): "id", (1,): "h", (0,): "v", (0, 1): "hv"}[self.axes]

    def image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) array -> the flipped (contiguous) array."""
        return np.ascontiguousarray(np.flip(image, self.axes)) if self.axes else image

    def box(self, box: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Half-open (x0, y0, x1, y1) box in original pixel coordinates -> the same box in the flipped image."""
        b = np.asarray(box, dtype=np.float64).copy()
        height, width = original_size
        if 1 in self.axes:
            b[[0, 2]] = width - b[[2, 0]]
        if 0 in self.axes:
            b[[1, 3]] = height - b[[3, 1]]
        return b

    def points(self, points: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(N, 2) xy pixel indices -> the same pixels in the flipped image."""
        p = np.asarray(points, dtype=np.float64).copy()
        height, width = original_size
        if 1 in self.axes:
            p[:, 0] = width - 1 - p[:, 0]
        if 0 in self.axes:
            p[:, 1] = height - 1 - p[:, 1]
        return p

    def restore(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., H_o, W_o) maps predicted on the flipped view -> the same maps on the original orientation."""
        return torch.flip(maps, [a - 2 for a in self.axes]) if self.axes else maps


def parse_tta(spec: str | None, argument: str = "--tta") -> tuple[FlipView, ...]:
    """``None``/``"none"`` -> the identity view only; ``"h,v"`` -> identity + horizontal + vertical flips.

    Flips are ``h`` (left-right), ``v`` (up-down) and ``hv`` (both); the identity view is always first.
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return (FlipView(),)
    names = [s.strip().lower() for s in str(spec).split(",") if s.strip()]
    unknown = [n for n in names if n not in _AXES]
    if unknown or len(set(names)) != len(names):
        raise ImedsamError(f"{argument}: expected 'none' or distinct flips among h, v, hv separated by commas "
                           f"(e.g. h,v), got {spec!r}")
    return (FlipView(),) + tuple(FlipView(_AXES[n]) for n in names)


@dataclass
class EncodedView:
    """A view with its prepared encoder input and image embedding."""

    view: FlipView
    prepared: PreparedImage
    embedding: torch.Tensor

    def prompts(self, box: np.ndarray | None = None, points: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> Prompts:
        """Checked prompts in the original image's pixels (half-open xyxy box; (N, 2) xy points with their
        labels) -> :class:`~imedsam.models.base.Prompts` in this view's encoder frame, on its device."""
        prepared, device = self.prepared, self.embedding.device
        out = Prompts()
        if box is not None:
            b = to_input_coords(self.view.box(box, prepared.original_size), prepared)
            out.boxes = torch.as_tensor(b, dtype=torch.float32, device=device).view(1, 4)
        if points is not None:
            p = to_input_coords(self.view.points(points, prepared.original_size), prepared)
            out.points = torch.as_tensor(p, dtype=torch.float32, device=device).view(1, -1, 2)
            out.labels = torch.as_tensor(labels, device=device).view(1, -1)
        return out


def encode_views(system, image: np.ndarray, views: tuple[FlipView, ...],
                 device: torch.device) -> list[EncodedView]:
    """Prepare and encode every view of ``image``; call under inference mode and the wanted autocast."""
    encoded = []
    for view in views:
        prepared = prepare_image(view.image(image), system.preprocess, device)
        encoded.append(EncodedView(view, prepared, system.encode(prepared.tensor, valid_hw=prepared.input_size)))
    return encoded


def mean_over_views(maps: list[torch.Tensor]) -> torch.Tensor:
    """The views' restored maps (each (..., H_o, W_o)) -> their mean; the one place views are combined."""
    return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
