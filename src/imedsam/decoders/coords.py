"""Query coordinates, coordinate encodings and bilinear feature sampling for implicit decoders.

One pixel-centre convention is used everywhere in imedsam:

* For an output grid of ``H x W`` pixels, pixel ``(i, j)`` (row ``i``, column ``j``) has the normalised
  coordinates ``y = (2 i + 1) / H - 1`` and ``x = (2 j + 1) / W - 1``, both in the open interval ``(-1, 1)``.
  A 1x1 grid is the single point ``(0, 0)``; a 17x23 or a 2048x2048 grid is defined the same way.
* Coordinates are stored as ``(..., 2)`` tensors in **(y, x)** order (row first, like array indices).
* Features are sampled at those coordinates with bilinear interpolation, ``align_corners=False`` and border
  clamping, so sampling a ``(C, h, w)`` map on an ``H x W`` grid gives exactly
  ``F.interpolate(map, (H, W), mode="bilinear", align_corners=False)``. ``F.grid_sample`` takes its grid in
  **(x, y)** order; :func:`sample_features` does the swap.

The official I-MedSAM code used corner-aligned coordinates (``linspace(-1, 1, H)``) for the Fourier encoding
while sampling features at pixel centres; :func:`grid_coords` with ``corner_aligned=True`` reproduces that
for comparisons only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.errors import ImedsamError

__all__ = [
    "PaperEncoding",
    "ReferenceEncoding",
    "bilinear_taps",
    "flat_index_coords",
    "grid_coords",
    "linear_interp_matrix",
    "sample_features",
]


def _check_size(h: int, w: int) -> None:
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ImedsamError(f"grid size ({h}, {w}) is invalid: height and width must be positive integers")


def flat_index_coords(
    index: torch.Tensor, h: int, w: int, dtype: torch.dtype = torch.float32, corner_aligned: bool = False
) -> torch.Tensor:
    """Coordinates ``(n, 2)`` in (y, x) order of the pixels with row-major flat indices ``index`` (n,).

    ``corner_aligned=False`` (default): pixel centres ``(2i+1)/H - 1``. ``corner_aligned=True``: the official
    I-MedSAM ``linspace(-1, 1, H)`` grid, ``2i/(H-1) - 1`` (``-1`` when ``H == 1``). The arithmetic is
    elementwise, so any subset of indices gives bit-identical values to :func:`grid_coords`.
    """
    _check_size(h, w)
    i = torch.div(index, w, rounding_mode="floor")
    j = index - i * w
    if corner_aligned:
        y = (2 * i).to(dtype) / max(h - 1, 1) - 1
        x = (2 * j).to(dtype) / max(w - 1, 1) - 1
    else:
        y = (2 * i + 1).to(dtype) / h - 1
        x = (2 * j + 1).to(dtype) / w - 1
    return torch.stack((y, x), dim=-1)


def grid_coords(
    h: int,
    w: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    corner_aligned: bool = False,
) -> torch.Tensor:
    """Normalised coordinates of every pixel of an ``h x w`` grid, shape ``(h*w, 2)``, (y, x), row-major.

    Pixel centres by default (see the module docstring); ``corner_aligned=True`` gives the official code's
    linspace grid, for comparisons only.
    """
    _check_size(h, w)
    index = torch.arange(h * w, device=device)
    return flat_index_coords(index, h, w, dtype=dtype, corner_aligned=corner_aligned)


def sample_features(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``features`` (B, C, h, w) at ``coords`` (B, N, 2) in (y, x) order -> (B, N, C).

    Convention: ``align_corners=False`` with border clamping, identical to ``F.interpolate(bilinear,
    align_corners=False)`` when ``coords`` is a pixel-centre grid. ``features`` may have batch 1 and is then
    shared by all ``B`` query sets.
    """
    if features.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ImedsamError(
            f"sample_features expects features (B, C, h, w) and coords (B, N, 2); got {tuple(features.shape)} "
            f"and {tuple(coords.shape)}"
        )
    b = coords.shape[0]
    if features.shape[0] == 1 and b > 1:
        features = features.expand(b, -1, -1, -1)
    grid = coords.flip(-1).unsqueeze(1).to(features.dtype)  # (B, 1, N, 2) in (x, y)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2).transpose(1, 2)


def bilinear_taps(coords: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four bilinear taps of points ``coords`` (n, 2) (y, x) on an ``h x w`` map.

    Returns ``index`` (n, 4) int64 row-major flat indices into the map and ``weight`` (n, 4) (dtype of
    ``coords``) such that ``sum_k weight[:, k] * map_flat[index[:, k]]`` equals :func:`sample_features`
    (``align_corners=False``, border clamping). The weights of each point sum to 1.
    """
    sy = (((coords[:, 0] + 1) * h - 1) / 2).clamp(0, h - 1)
    sx = (((coords[:, 1] + 1) * w - 1) / 2).clamp(0, w - 1)
    y0f = sy.floor()
    x0f = sx.floor()
    wy = sy - y0f
    wx = sx - x0f
    y0 = y0f.long()
    x0 = x0f.long()
    y1 = (y0 + 1).clamp(max=h - 1)
    x1 = (x0 + 1).clamp(max=w - 1)
    index = torch.stack((y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1), dim=1)
    weight = torch.stack(((1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx), dim=1)
    return index, weight


def linear_interp_matrix(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Dense 1-D interpolation matrix (n, length), fp32: row i holds the linear-interpolation weights of the
    normalised coordinate ``pos[i]`` on a ``length``-sample axis, in the convention of :func:`bilinear_taps`
    (``align_corners=False``, border clamping; each row sums to 1)."""
    points = torch.stack((torch.zeros_like(pos), pos), dim=1).float()
    index, weight = bilinear_taps(points, 1, length)  # one row: only the first two taps carry weight
    out = torch.zeros(len(pos), length, device=pos.device)
    return out.scatter_add_(1, index[:, :2], weight[:, :2])


class PaperEncoding(nn.Module):
    """The I-MedSAM paper's Fourier encoding of 2-D points, integer octaves with a pi factor.

    For ``p = (y, x)`` and ``L = num_octaves``, the output is, octave by octave (interleaved as in the paper's
    ``gamma(p) = (sin(2^0 pi p), cos(2^0 pi p), ..., sin(2^{L-1} pi p), cos(2^{L-1} pi p))``)::

        [sin(2^k pi y), sin(2^k pi x), cos(2^k pi y), cos(2^k pi x)]  for k = 0 .. L-1
        followed by [y, x] when include_input

    Input ``(..., 2)`` in (y, x); output ``(..., out_dim)`` with ``out_dim = 4 L + 2 * include_input``
    (42 for the defaults). Every output column depends on one coordinate only (``separable``), which lets the
    implicit decoder evaluate grids row- and column-wise.
    """

    separable = True

    def __init__(self, num_octaves: int = 10, include_input: bool = True) -> None:
        super().__init__()
        if num_octaves < 0:
            raise ImedsamError(f"num_octaves={num_octaves} must be >= 0")
        self.num_octaves = int(num_octaves)
        self.include_input = bool(include_input)
        self.out_dim = 4 * self.num_octaves + (2 if self.include_input else 0)
        freqs = math.pi * (2.0 ** torch.arange(self.num_octaves, dtype=torch.float64))
        self.register_buffer("freqs", freqs, persistent=False)  # float64; cast at use

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[-1] != 2:
            raise ImedsamError(f"PaperEncoding expects points (..., 2) in (y, x); got {tuple(p.shape)}")
        angles = p.unsqueeze(-2) * self.freqs.to(p.dtype).unsqueeze(-1)  # (..., L, 2)
        feats = torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., 4L)
        if self.include_input:
            feats = torch.cat((feats, p), dim=-1)
        return feats

    def extra_repr(self) -> str:
        return f"num_octaves={self.num_octaves}, include_input={self.include_input}, out_dim={self.out_dim}"


class ReferenceEncoding(nn.Module):
    """The official I-MedSAM code's 63-d Fourier encoding (``FrequancyEncoding``), for comparisons.

    Points ``(..., 2)`` in (y, x) are lifted to 3-D ``(z, y, x)`` with a constant ``z = -1``; with
    ``f_k = 2^(10 k / 9)``, k = 0..9, the output is::

        [sin(2 pi f_k c) for c in (z, y, x), k inner]   (30)
        [cos(2 pi f_k c) same order]                     (30)
        [z, y, x]                                        (3)

    The official code wrote cos as ``sin(theta + pi/2)``; ``cos`` is used here (equal up to rounding). The
    official coordinates were corner-aligned (``linspace``); here the caller decides (pixel centres by
    default, see :func:`grid_coords`). ``out_dim == 63``; every column depends on one coordinate only.
    """

    separable = True

    def __init__(self, num_frequencies: int = 10, max_exponent: float = 10.0) -> None:
        super().__init__()
        self.num_frequencies = int(num_frequencies)
        self.out_dim = 3 * (2 * self.num_frequencies + 1)
        if self.num_frequencies > 1:
            exps = torch.linspace(0.0, max_exponent, self.num_frequencies, dtype=torch.float64)
        else:
            exps = torch.zeros(self.num_frequencies, dtype=torch.float64)
        self.register_buffer("freqs", 2 * math.pi * 2.0**exps, persistent=False)  # float64; cast at use

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[-1] != 2:
            raise ImedsamError(f"ReferenceEncoding expects points (..., 2) in (y, x); got {tuple(p.shape)}")
        z = torch.full_like(p[..., :1], -1.0)
        c = torch.cat((z, p), dim=-1)  # (..., 3) (z, y, x)
        angles = (c.unsqueeze(-1) * self.freqs.to(p.dtype)).flatten(-2)  # (..., 3K), k inner
        return torch.cat((angles.sin(), angles.cos(), c), dim=-1)

    def extra_repr(self) -> str:
        return f"num_frequencies={self.num_frequencies}, out_dim={self.out_dim}"
