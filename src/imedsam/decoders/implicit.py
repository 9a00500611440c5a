"""I-MedSAM's implicit segmentation decoder: coarse INR, uncertainty-guided sampling (UGS), fine INR.

The decoder receives features, not a SAM model:

* ``features`` U, shape (B, Cf, h, w): the SAM mask-decoder trunk output after ``output_upscaling`` (32
  channels at 4x the embedding size, e.g. 96x96 for a 384 input);
* ``prompt_pe``, shape (B or 1, Cp, h', w'): the dense prompt positional encoding (256 channels, 24x24);
* either an output grid ``size=(H, W)`` or query points ``coords`` (B, N, 2) in the normalised (y, x)
  pixel-centre convention of :mod:`imedsam.decoders.coords`.

Per query point p: ``z = [U(p) || PE(p) || gamma(p)]`` (bilinear, ``align_corners=False``), then

1. coarse MLP ``Linear -> BN -> ReLU`` (``coarse_hidden``) and a head ``Linear(512 -> 1 + 256)`` per class
   giving a coarse logit and a 256-d coarse feature;
2. uncertainty from ``mc_samples`` Monte-Carlo dropout passes;
3. per image (and class), the ``topk_ratio`` most uncertain points;
4. fine MLP on ``[z || coarse feature]`` at those points; its logits REPLACE the coarse logits there.

Two modes (see the docs, systems.md A.8-A.11, A.18-A.19):

``mode="paper"`` (default, corrected):
    * ``PaperEncoding`` (42-d), dropout on the 512-d trunk output (before the head);
    * uncertainty = population variance over T passes of the sigmoid probabilities of the logit column;
    * MC dropout is active at inference too. Each pass t draws ONE dropout mask over the 512 trunk channels per
      image, shared by all points of that image (channel-wise, like ``Dropout2d``). For every single point the
      T logits are therefore distributed exactly like independent-mask MC dropout, while a pass costs only
      512 MACs per point (the mask folds into the logit weights), masks do not depend on chunking, and results
      are reproducible from ``seed`` (default ``config.mc_seed``) or a ``torch.Generator``;
    * at inference the coarse logits/features are the deterministic (dropout-off) pass; in training they are
      the standard per-element dropout pass (this is what the loss sees), and uncertainty is computed without
      gradient from the shared-mask passes;
    * points whose uncertainty is exactly 0 are never refined, so an image can get fewer than k fine points
      (never an arbitrary choice, unlike the official code at inference);
    * ``mc_samples`` defaults to 8 (the paper gives no T; the official code hard-codes 2).

``mode="reference"`` (the official code's behaviour, for comparisons):
    * ``ReferenceEncoding`` (63-d), dropout (per element) on the 257-d head output, T = 2 full passes of
      trunk + head + dropout in training (BatchNorm statistics updated T times), outputs from the last pass;
    * uncertainty = mean over the 257 channels of the unbiased variance of the raw outputs;
    * at inference dropout is off, so uncertainty is identically 0 and ``torch.topk`` picks the k refined
      points among ties (the official bug F.1, reproduced on purpose; the coarse MLP runs once, not twice);
    * top-k is per image here too (the official pooled top-k over the batch is bug F.13, not reproduced);
    * coordinates for the encoding are pixel centres unless ``corner_aligned_encoding=True`` (the official
      linspace grid; grid mode only). Features are always sampled at pixel centres.

Inference (``model.eval()``) uses a fast path that runs under ``torch.no_grad()`` and gives the same values
as the plain module path up to float rounding:

* BatchNorm is folded into the preceding Linear;
* the PE part of the first coarse and fine Linear layers is applied at LOW resolution (256 channels on 24x24)
  and the projected map is interpolated (bilinear interpolation is linear, so this is the same function);
* on a whole grid (pass 1) in bf16/fp16 (``row_gemm``), the first coarse layer runs a block of rows at a time
  as ONE matrix product with the ReLU fused (:mod:`imedsam.decoders.grid_rows`: interpolation and the
  separable encoding are factored into a fixed x-side matrix and per-row y-side tables);
* at other points (query coordinates, pass 2, adaptive decoding), the PE taps and, for grids, the encoding
  evaluated once per row and per column (every encoding column depends on one coordinate) are summed in one
  ``embedding_bag`` call; the U part (32 channels) is sampled at the points and projected by a K = 32 GEMM
  added in place;
* the trunk's Linear (+ ReLU) layers run as oneDNN's fused CPU kernel where available (one write of the
  output instead of bias copy, GEMM and ReLU passes);
* pass 1 runs over all points in chunks of ``chunk_size`` points per image (with ``row_gemm``: blocks of
  ``max(1, min(chunk_size, 8192) // W)`` rows; bounded memory whatever the output size) and yields coarse
  logits + uncertainty; pass 2 runs over the selected points only and computes the trunk again (or reuses it
  when the image fitted in one chunk), the 256 coarse-feature channels and the fine MLP. Chunking does not
  change the result;
* cost with the default widths: about 0.54 M MACs per point in pass 1 (the 1024x512 layer dominates) plus
  about 0.83 M per refined point in pass 2, i.e. ~0.64 M MACs per output pixel at 12.5 % (the official code:
  2.06 M), ~95 GMACs for a 384x384 grid;
* ``adaptive=True`` (grids whose output is at least 4x finer than U, i.e. ``adaptive_stride >= 2``): pass 1 runs
  on a lattice of every s-th row and column (plus the last ones) first; lattice cells whose corners disagree
  on the decision sign (of the coarse logit plus ``prior_logits`` when given), and their 4 edge neighbours, are
  then evaluated exactly at every pixel; inside the other cells the coarse logits and the uncertainty are
  interpolated bilinearly from the lattice. Cost grows with the boundary length instead of the area (2048^2
  from U at 96^2 evaluates a few % of the pixels). An approximation: a structure thinner than s pixels that
  falls between lattice points is missed; off by default;
* uncertainty and top-k are computed in fp32; everything else follows ``torch.autocast`` when enabled (bf16
  on CPU works; on CPUs without native bf16 it is slower than fp32). Returned tensors are fp32.

Training (``model.train()``) uses the plain module path on all points at once (BatchNorm needs the batch
statistics), typically on a subset of points from :func:`sample_training_points`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.decoders.coords import (
    PaperEncoding,
    ReferenceEncoding,
    bilinear_taps,
    flat_index_coords,
    grid_coords,
    sample_features,
)
from imedsam.decoders.grid_rows import GridBasis, GridFirstLayer
from imedsam.decoders.linear import linear as _linear
from imedsam.errors import ImedsamError

__all__ = [
    "ImplicitDecoder",
    "ImplicitDecoderConfig",
    "ImplicitOutput",
    "sample_training_points",
    "mc_variance",
    "select_topk",
]

logger = logging.getLogger(__name__)

#: At most this many points per row block of the first-layer GEMM (:mod:`imedsam.decoders.grid_rows`): its
#: (points, 1024) output is then about 16 MB in bf16; 4x larger blocks measured 1.5x slower on 2 CPU cores.
_ROW_BLOCK_POINTS = 8192

Mode = Literal["paper", "reference"]


class ImplicitDecoderConfig(BaseModel):
    """Options of :class:`ImplicitDecoder` (the ``model.decoder`` section of an I-MedSAM config).

    The widths that come from the backbone (``feature_dim``, ``prompt_dim``) and the system's ``mode`` are
    arguments of :class:`ImplicitDecoder`, not options. ``encoding`` and ``mc_samples`` default from the mode:
    paper -> ("paper", 8), reference -> ("reference", 2). ``chunk_size`` is the number of query points per image
    processed at once at inference. ``coarse_feature_dim`` is the width of the coarse feature passed to the fine
    MLP. ``fine_hidden`` lists the fine trunk widths followed by the width of the per-class fine head's hidden
    layer (at least two entries). ``adaptive`` (inference, grids only) evaluates pass 1 exactly only near the
    decision boundary: see :meth:`ImplicitDecoder.adaptive_stride` and the module docstring. ``row_gemm``
    (inference, whole grids) evaluates the first coarse layer a block of rows at a time as one GEMM
    (:mod:`imedsam.decoders.grid_rows`); ``None`` = when the compute dtype is bf16 or fp16 (on a 2-core CPU it is
    about 3x faster than per-pixel taps in bf16, and slower in fp32, where the GEMM rate is a quarter).
    """

    model_config = ConfigDict(extra="forbid")

    encoding: Literal["paper", "reference"] | None = Field(None, description="coordinate encoding; null: the mode's")
    num_octaves: int = Field(10, ge=1, description="octaves of the paper encoding")
    coarse_hidden: tuple[int, ...] = Field((1024, 512), min_length=1, description="coarse MLP widths")
    coarse_feature_dim: int = Field(256, ge=1, description="coarse feature passed to the fine MLP")
    fine_hidden: tuple[int, ...] = Field((256, 256, 128), min_length=2,
                                         description="fine trunk widths, then the fine head's hidden width")
    dropout: float = Field(0.5, ge=0, lt=1, description="MC dropout on the coarse trunk output")
    mc_samples: int | None = Field(None, ge=1, description="Monte-Carlo dropout passes T; null: the mode's (8 / 2)")
    topk_ratio: float = Field(0.125, ge=0, le=1, description="fraction of most uncertain points refined per image")
    num_classes: int = Field(1, ge=1, description="class heads (one logit map per class)")
    chunk_size: int = Field(16384, ge=1, description="points decoded per chunk at inference (bounds memory; "
                                                     "16384 was fastest on 2 CPU cores)")
    mc_seed: int = Field(0, description="seed of the MC-dropout masks at inference when none is passed")
    corner_aligned_encoding: bool = Field(False, description="encode grid coordinates corner-aligned (the "
                                                             "official linspace grid)")
    adaptive: bool = Field(False, description="inference on output grids at least 4x finer than the decoder "
                                              "features: evaluate exactly only near the decision boundary, "
                                              "interpolate elsewhere (fast large grids; an approximation)")
    row_gemm: bool | None = Field(None, description="first coarse layer as one GEMM per block of rows on whole "
                                                    "grids; null: in bf16/fp16 only")

    @field_validator("coarse_hidden", "fine_hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if min(v) < 1:
            raise ValueError(f"widths must be >= 1, got {list(v)}")
        return v


@dataclass
class ImplicitOutput:
    """Result of :class:`ImplicitDecoder`.

    Shapes are (B, C, H, W) for a grid query and (B, C, N) for point queries; C = ``num_classes``.

    * ``coarse_logits``: coarse INR logits at every point;
    * ``fine_logits``: the coarse logits with the selected points replaced by fine INR logits (the prediction);
    * ``uncertainty``: fp32 per-point uncertainty used for the selection (see the module docstring for its
      definition in each mode); ``None`` when refinement is disabled (``mc_samples == 1``, ``topk_ratio == 0``);
    * ``selected``: bool, True where the fine INR replaced the coarse logit; ``None`` when refinement is
      disabled.
    """

    coarse_logits: torch.Tensor
    fine_logits: torch.Tensor
    uncertainty: torch.Tensor | None = None
    selected: torch.Tensor | None = None


def _mlp(in_dim: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    return nn.Sequential(*layers)


def _fold(linear: nn.Linear, bn: nn.BatchNorm1d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of ``bn(linear(x))`` in eval mode, in fp32."""
    weight = linear.weight.detach().float()
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(weight[:, 0])
    if bn is None:
        return weight, bias
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return weight * scale[:, None], (bias - bn.running_mean.float()) * scale + bn.bias.detach().float()


def _folded_layers(seq: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Folded (W, b, relu_after) triples of a Sequential made of Linear [-> BN] [-> ReLU] blocks."""
    mods = list(seq)
    out: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    i = 0
    while i < len(mods):
        lin = mods[i]
        assert isinstance(lin, nn.Linear)
        bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm1d) else None
        i += 2 if bn is not None else 1
        relu = i < len(mods) and isinstance(mods[i], nn.ReLU)
        i += 1 if relu else 0
        w, b = _fold(lin, bn)
        out.append((w, b, relu))
    return out


class _FastGeometry(NamedTuple):
    """Where the fast path reads its inputs: output grid (or None for coords), the U and PE grids, the PE row
    count of the first-layer table, and whether the encoding term comes from per-row/column grid tables."""

    size: tuple[int, int] | None
    hw_u: tuple[int, int]
    hw_p: tuple[int, int]
    rows_p: int
    grid_tables: bool


class _FirstLayer(NamedTuple):
    """One image's first Linear of the coarse or the fine MLP (BN folded), split by input part.

    ``table`` (h'*w' [+ H + W], D): ``W_PE PE`` at each PE pixel [+ the encoding row and column tables of a
    grid, bias included]; ``w_u`` (D, Cf): weights of the U part; ``w_ug`` (D, Cf + G) and ``bias`` (D,): the
    U and encoding parts and the bias for point queries (grids read the encoding and bias from the table).
    Stored in the compute dtype.
    """

    table: torch.Tensor
    w_u: torch.Tensor
    w_ug: torch.Tensor
    bias: torch.Tensor


def _cast_layers(layers: list[tuple[torch.Tensor, torch.Tensor, bool]],
                 dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Folded (weight, bias, relu) layers with contiguous weights and biases in ``dtype``."""
    return [(w.to(dtype).contiguous(), b.to(dtype), relu) for w, b, relu in layers]


def _run_layers(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> torch.Tensor:
    """Apply folded (weight, bias, relu) layers (already in x's dtype, see :func:`_cast_layers`) to (n, in)."""
    for w, bias, relu in layers:
        x = _linear(x, w, bias, relu)
    return x


def mc_variance(mc_logits: torch.Tensor) -> torch.Tensor:
    """Population variance over the last axis (the T passes) of the sigmoid probabilities, in fp32.

    Computed on the probabilities shifted by the first pass (exactly 0 when all passes agree) and clamped at 0;
    equal to ``torch.sigmoid(x).var(-1, unbiased=False)`` up to float rounding but an order of magnitude faster
    on CPU for small T.
    """
    p = torch.sigmoid(mc_logits.float())
    d = p - p[..., :1]
    return (d.square().mean(-1) - d.mean(-1).square()).clamp_min_(0.0)


def select_topk(uncertainty: torch.Tensor, k: int, skip_zero: bool = True) -> torch.Tensor:
    """Per-row top-k selection mask.

    ``uncertainty`` (..., N) is reduced in fp32 along its last axis; returns a bool tensor of the same shape
    with (at most) ``k`` True entries per row: the k largest values. With ``skip_zero`` the entries whose
    uncertainty is exactly 0 are dropped from the selection (nothing is refined at random).
    """
    selected = torch.zeros(uncertainty.shape, dtype=torch.bool, device=uncertainty.device)
    n = uncertainty.shape[-1]
    k = min(int(k), n)
    if k <= 0:
        return selected
    u = uncertainty.float()
    values, index = torch.topk(u, k, dim=-1, sorted=False)
    keep = values > 0 if skip_zero else torch.ones_like(values, dtype=torch.bool)
    selected.scatter_(-1, index, keep)
    return selected


class ImplicitDecoder(nn.Module):
    """I-MedSAM's implicit decoder (coarse INR, UGS, fine INR); see the module docstring.

    Parameters are grouped as ``coarse_trunk`` (Sequential), ``coarse_heads`` (one ``Linear(hidden -> 1 +
    coarse_feature_dim)`` per class; output column 0 is the logit), ``fine_trunk`` (Sequential) and
    ``fine_heads`` (one ``Linear -> BN -> ReLU -> Linear(-> 1)`` per class). With ``mode="reference"`` and
    one class the counts are 888,320 / 131,841 / 222,464 / 33,281 as in the official code.
    """

    def __init__(self, config: ImplicitDecoderConfig | None = None, *, feature_dim: int = 32,
                 prompt_dim: int = 256, mode: Mode = "paper") -> None:
        super().__init__()
        cfg = config if config is not None else ImplicitDecoderConfig()
        if mode not in ("paper", "reference"):
            raise ImedsamError(f"ImplicitDecoder mode={mode!r}: use 'paper' or 'reference'")
        if int(feature_dim) < 1 or int(prompt_dim) < 0:
            raise ImedsamError(f"ImplicitDecoder needs feature_dim >= 1 and prompt_dim >= 0, got {feature_dim}, "
                               f"{prompt_dim}")
        self.config = cfg
        self.feature_dim, self.prompt_dim, self.mode = int(feature_dim), int(prompt_dim), mode
        self.encoding_name = cfg.encoding or mode
        self.mc_samples = cfg.mc_samples or (8 if mode == "paper" else 2)
        if self.encoding_name == "paper":
            self.encoding: PaperEncoding | ReferenceEncoding = PaperEncoding(cfg.num_octaves, include_input=True)
        else:
            self.encoding = ReferenceEncoding()
        self.in_dim = self.feature_dim + self.prompt_dim + self.encoding.out_dim
        self.fine_in_dim = self.in_dim + cfg.coarse_feature_dim
        trunk_out = cfg.coarse_hidden[-1]
        self.coarse_trunk = _mlp(self.in_dim, cfg.coarse_hidden)
        self.coarse_heads = nn.ModuleList(
            nn.Linear(trunk_out, 1 + cfg.coarse_feature_dim) for _ in range(cfg.num_classes)
        )
        self.fine_trunk = _mlp(self.fine_in_dim, cfg.fine_hidden[:-1])
        head_in, head_hidden = cfg.fine_hidden[-2], cfg.fine_hidden[-1]
        self.fine_heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(head_in, head_hidden),
                nn.BatchNorm1d(head_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(head_hidden, 1),
            )
            for _ in range(cfg.num_classes)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    # ------------------------------------------------------------------ public helpers

    def parameter_groups(self) -> dict[str, int]:
        """Number of parameters per group (``coarse_trunk``, ``fine_trunk``, ``coarse_head``, ``fine_head``)
        and their ``total``. BatchNorm running statistics are buffers and are not counted."""
        groups = {
            "coarse_trunk": self.coarse_trunk,
            "fine_trunk": self.fine_trunk,
            "coarse_head": self.coarse_heads,
            "fine_head": self.fine_heads,
        }
        counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in groups.items()}
        counts["total"] = sum(counts.values())
        return counts

    @property
    def refinement_enabled(self) -> bool:
        """False when ``mc_samples == 1`` or ``topk_ratio == 0``: the fine INR is never run."""
        return self.mc_samples > 1 and self.config.topk_ratio > 0

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        features: torch.Tensor,
        prompt_pe: torch.Tensor,
        size: tuple[int, int] | None = None,
        coords: torch.Tensor | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        fast: bool | None = None,
        prior_logits: torch.Tensor | None = None,
    ) -> ImplicitOutput:
        """Decode logits at a grid (``size=(H, W)``) or at query points (``coords`` (B, N, 2), (y, x)).

        ``features`` (B, Cf, h, w); ``prompt_pe`` (B or 1, Cp, h', w'). Monte-Carlo dropout masks come from
        ``generator`` if given, else (inference) a generator seeded with ``seed`` or ``config.mc_seed``, else
        (training) the global RNG. ``fast`` (default: ``not self.training``) picks the chunked inference path;
        ``fast=False`` forces the plain module path (all points at once, used to check the fast path).
        ``prior_logits`` (B, C, h'', w''): logits the CALLER adds to the output afterwards (e.g. a SAM prior);
        they are not added here and only steer where ``config.adaptive`` evaluates exactly.
        """
        cfg = self.config
        if (size is None) == (coords is None):
            raise ImedsamError("ImplicitDecoder: pass exactly one of size=(H, W) or coords=(B, N, 2)")
        if features.dim() != 4 or features.shape[1] != self.feature_dim:
            raise ImedsamError(
                f"ImplicitDecoder features must be (B, {self.feature_dim}, h, w); got {tuple(features.shape)}"
            )
        b = features.shape[0]
        if (
            prompt_pe.dim() != 4
            or prompt_pe.shape[1] != self.prompt_dim
            or prompt_pe.shape[0] not in (1, b)
        ):
            raise ImedsamError(
                f"ImplicitDecoder prompt_pe must be (B or 1, {self.prompt_dim}, h', w'); got {tuple(prompt_pe.shape)}"
            )
        if size is not None:
            if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
                raise ImedsamError(f"ImplicitDecoder size={size!r}: use a positive (H, W)")
            size = (int(size[0]), int(size[1]))
        else:
            assert coords is not None
            if coords.dim() != 3 or coords.shape[0] != b or coords.shape[2] != 2:
                raise ImedsamError(
                    f"ImplicitDecoder coords must be (B={b}, N, 2) in (y, x); got {tuple(coords.shape)}"
                )
        if fast is None:
            fast = not self.training
        if fast and self.training:
            raise ImedsamError("ImplicitDecoder fast=True is inference-only: call model.eval() first")

        masks = self._mc_masks(b, features.device, seed, generator)
        if fast:
            with torch.no_grad():
                out = self._forward_fast(features, prompt_pe, size, coords, masks, prior_logits)
        else:
            out = self._forward_plain(features, prompt_pe, size, coords, masks)
        if size is not None:
            shape = (b, cfg.num_classes, size[0], size[1])
            out = ImplicitOutput(
                *(t.reshape(shape) if t is not None else None for t in (out.coarse_logits, out.fine_logits,
                                                                         out.uncertainty, out.selected))
            )
        return out

    # ------------------------------------------------------------------ shared pieces

    def _mc_masks(
        self, b: int, device: torch.device, seed: int | None, generator: torch.Generator | None
    ) -> torch.Tensor | None:
        """Paper mode: (B, T, D) scaled keep-masks (0 or 1/(1-p)) over the trunk output, one per image and pass."""
        cfg = self.config
        if self.mode != "paper" or not self.refinement_enabled:
            return None
        if generator is None and not self.training:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.mc_seed if seed is None else int(seed))
        d = cfg.coarse_hidden[-1]
        keep = torch.rand((b, self.mc_samples, d), generator=generator, device=device) >= cfg.dropout
        return keep.float() / (1.0 - cfg.dropout)

    def _k(self, n: int) -> int:
        return int(n * self.config.topk_ratio) if self.refinement_enabled else 0

    def _encoding_coords(
        self, size: tuple[int, int] | None, coords_b: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor:
        """Coordinates fed to the Fourier encoding (corner-aligned only for grids in that option)."""
        if size is not None and self.config.corner_aligned_encoding:
            assert index is not None
            return flat_index_coords(index, size[0], size[1], dtype=coords_b.dtype, corner_aligned=True)
        return coords_b

    # ------------------------------------------------------------------ plain (training) path

    def _forward_plain(
        self,
        features: torch.Tensor,
        prompt_pe: torch.Tensor,
        size: tuple[int, int] | None,
        coords: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> ImplicitOutput:
        cfg = self.config
        b = features.shape[0]
        c_cls = cfg.num_classes
        if size is not None:
            pts = grid_coords(size[0], size[1], device=features.device).unsqueeze(0).expand(b, -1, -1)
            index = torch.arange(size[0] * size[1], device=features.device)
        else:
            assert coords is not None
            pts = coords.float()
            index = None
        n = pts.shape[1]
        if index is not None:
            enc_pts = self._encoding_coords(size, pts[0], index).unsqueeze(0).expand(b, -1, -1)
        else:
            enc_pts = pts
        gamma = self.encoding(enc_pts).to(features.dtype)
        z = torch.cat((sample_features(features, pts), sample_features(prompt_pe, pts), gamma), dim=-1)
        z = z.reshape(b * n, self.in_dim)

        uncertainty: torch.Tensor | None = None
        if self.mode == "paper":
            h = self.coarse_trunk(z)
            head_in = self.dropout(h) if self.training else h
            outs = [head(head_in) for head in self.coarse_heads]  # C x (B*N, 1+F)
            if masks is not None:
                with torch.no_grad():
                    w_logit = torch.stack([head.weight[0] for head in self.coarse_heads]).float()  # (C, D)
                    b_logit = torch.stack([head.bias[0] for head in self.coarse_heads]).float()  # (C,)
                    hb = h.detach().float().reshape(b, n, -1)
                    w_mc = masks[:, :, None, :] * w_logit[None, None]  # (B, T, C, D)
                    mc = torch.einsum("bnd,btcd->bnct", hb, w_mc) + b_logit[:, None]
                    uncertainty = mc_variance(mc).permute(0, 2, 1)  # (B, C, N)
        else:
            passes = self.mc_samples if (self.training and self.refinement_enabled) else 1
            all_outs = []
            for _ in range(passes):
                h = self.coarse_trunk(z)
                all_outs.append([self.dropout(head(h)) for head in self.coarse_heads])
            outs = all_outs[-1]
            if self.refinement_enabled:
                if passes > 1:
                    with torch.no_grad():
                        stacked = torch.stack([torch.stack(o) for o in all_outs]).float()  # (T, C, B*N, 1+F)
                        u = stacked.var(dim=0, unbiased=True).mean(dim=-1)  # (C, B*N)
                        uncertainty = u.reshape(c_cls, b, n).permute(1, 0, 2)
                else:
                    uncertainty = torch.zeros(b, c_cls, n, device=features.device)

        coarse = torch.stack([o[:, 0] for o in outs]).reshape(c_cls, b, n).permute(1, 0, 2)  # (B, C, N)
        coarse_f = coarse.float()
        if uncertainty is None:
            return ImplicitOutput(coarse_f, coarse_f.clone(), None, None)
        selected = select_topk(uncertainty, self._k(n), skip_zero=self.mode == "paper")
        fine_per_class = [coarse_f[:, c] for c in range(c_cls)]  # out of place: gradients reach the coarse branch
        for c in range(c_cls):
            sel = selected[:, c].reshape(b * n)
            if not bool(sel.any()):
                continue
            fin = torch.cat((z[sel], outs[c][sel, 1:].to(z.dtype)), dim=-1)
            logit = self.fine_heads[c](self.fine_trunk(fin))[:, 0].float()
            fine_per_class[c] = fine_per_class[c].reshape(b * n).masked_scatter(sel, logit).reshape(b, n)
        fine = torch.stack(fine_per_class, dim=1)
        return ImplicitOutput(coarse_f, fine, uncertainty, selected)

    # ------------------------------------------------------------------ fast (inference) path

    def _forward_fast(
        self,
        features: torch.Tensor,
        prompt_pe: torch.Tensor,
        size: tuple[int, int] | None,
        coords: torch.Tensor | None,
        masks: torch.Tensor | None,
        prior_logits: torch.Tensor | None = None,
    ) -> ImplicitOutput:
        cfg = self.config
        dev = features.device
        b = features.shape[0]
        c_cls = cfg.num_classes
        n = size[0] * size[1] if size is not None else coords.shape[1]  # type: ignore[union-attr]
        cf, cp = self.feature_dim, self.prompt_dim
        h_u, w_u = features.shape[-2:]
        h_p, w_p = prompt_pe.shape[-2:]
        rows_p = h_p * w_p

        # Folded weights (fp32), split by input part.
        coarse_layers = _folded_layers(self.coarse_trunk)
        w1, b1, _ = coarse_layers[0]
        w1_u, w1_p, w1_g = w1[:, :cf], w1[:, cf : cf + cp], w1[:, cf + cp :]
        fine_layers = _folded_layers(self.fine_trunk)
        wf, bf, _ = fine_layers[0]
        wf_u, wf_p = wf[:, :cf], wf[:, cf : cf + cp]
        wf_g, wf_c = wf[:, cf + cp : self.in_dim], wf[:, self.in_dim :]
        heads_w = torch.stack([h.weight.detach().float() for h in self.coarse_heads])  # (C, 1+F, D)
        heads_b = torch.stack([h.bias.detach().float() for h in self.coarse_heads])  # (C, 1+F)
        fine_head_layers = [_folded_layers(h) for h in self.fine_heads]
        # Everything after the first layers runs in the compute dtype: cast those weights once, not per chunk.
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        trunk_layers = _cast_layers(coarse_layers[1:], dtype)
        fine_rest = [_cast_layers(fine_layers[1:] + head, dtype) for head in fine_head_layers]
        wf_c_t = wf_c.t().to(dtype)

        # Row/column tables of the encoding part for grids; bias folded into the row table.
        grid_tables = size is not None and getattr(self.encoding, "separable", False)
        tab_c = tab_f = None
        if grid_tables:
            assert size is not None
            with torch.autocast(dev.type, enabled=False):
                tab_c = self._separable_tables(size[0], size[1], w1_g, b1, dev)
                tab_f = self._separable_tables(size[0], size[1], wf_g, bf, dev)

        # Logit weights for the deterministic pass + T MC passes (paper mode), per image.
        w_logit, b_logit = heads_w[:, 0], heads_b[:, 0]  # (C, D), (C,)
        w_feat, b_feat = heads_w[:, 1:].to(dtype).contiguous(), heads_b[:, 1:].to(dtype)  # coarse features
        refine = self.refinement_enabled
        t_mc = self.mc_samples

        coarse = torch.empty(b, c_cls, n, device=dev)
        fine = torch.empty(b, c_cls, n, device=dev)
        uncertainty = torch.zeros(b, c_cls, n, device=dev) if refine else None
        selected = torch.zeros(b, c_cls, n, dtype=torch.bool, device=dev) if refine else None
        chunk = cfg.chunk_size
        k = self._k(n)
        geo = _FastGeometry(size, (h_u, w_u), (h_p, w_p), rows_p, grid_tables)
        stride = self.adaptive_stride(size, (h_u, w_u)) if cfg.adaptive and size is not None else 1
        basis = None  # whole grids: pass 1 evaluates the first layer a block of rows at a time, as one GEMM
        row_gemm = cfg.row_gemm if cfg.row_gemm is not None else dtype in (torch.bfloat16, torch.float16)
        if grid_tables and stride < 2 and row_gemm:
            assert size is not None
            basis = GridBasis.build(size, (h_p, w_p), (h_u, w_u), self.encoding, cfg.corner_aligned_encoding,
                                    dtype, dev)

        # Images are independent (top-k is per image): pass 1, selection and pass 2 run image by image.
        for bi in range(b):
            pe_b = prompt_pe[bi if prompt_pe.shape[0] > 1 else 0]
            first_c = self._first_layer(pe_b, w1_u, w1_p, w1_g, b1, tab_c, dtype)
            first_f = self._first_layer(pe_b, wf_u, wf_p, wf_g, bf, tab_f, dtype)
            u_flat = features[bi].reshape(cf, -1).t().to(dtype)  # (h*w, Cf)
            if masks is not None:
                w_mc = (masks[bi][:, None, :] * w_logit[None]).transpose(0, 1).reshape(c_cls * t_mc, -1)
                w_all = torch.cat((w_logit, w_mc))
                b_all = torch.cat((b_logit, b_logit.repeat_interleave(t_mc)))
            else:
                w_all, b_all = w_logit, b_logit
            w_all, b_all = w_all.to(dtype).contiguous(), b_all.to(dtype)

            def emit(trunk: torch.Tensor, idx: torch.Tensor) -> None:
                """Coarse logits (+ MC logits -> uncertainty, fp32) from the trunk output at flat ``idx``."""
                out = _linear(trunk, w_all, b_all, relu=False).float()
                coarse[bi, :, idx] = out[:, :c_cls].t()
                if uncertainty is not None and masks is not None:
                    mc = out[:, c_cls:].reshape(-1, c_cls, t_mc)
                    uncertainty[bi, :, idx] = mc_variance(mc).t()

            def pass1(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
                """:func:`emit` at flat ``points``, chunked; returns (trunk, points) when they came in one
                chunk (the trunk is reused in pass 2)."""
                trunk = None
                for start in range(0, points.numel(), chunk):
                    idx = points[start : start + chunk]
                    pts = self._points(size, coords, bi, idx)
                    trunk = self._trunk_fast(first_c, u_flat, pts, idx, geo, trunk_layers)
                    emit(trunk, idx)
                return (trunk, points) if trunk is not None and points.numel() <= chunk else None

            def pass1_rows() -> tuple[torch.Tensor, torch.Tensor] | None:
                """:func:`emit` on every pixel of the grid, a block of whole rows at a time (:mod:`grid_rows`);
                returns (trunk, flat indices) when one block covered the grid."""
                assert size is not None and basis is not None
                assert tab_c is not None  # the PE projection and row table of the per-point path, reused
                pe_proj = first_c.table[:rows_p].reshape(h_p, w_p, -1)
                layer = GridFirstLayer(basis, pe_proj, features[bi], w1_u, w1_g, tab_c[0], dtype)
                step = max(1, min(chunk, _ROW_BLOCK_POINTS) // size[1])
                for r0 in range(0, size[0], step):
                    r1 = min(r0 + step, size[0])
                    idx = basis.block_index(r0, r1)
                    trunk = _run_layers(layer.rows(r0, r1), trunk_layers)
                    emit(trunk, idx)
                return (trunk, idx) if step >= size[0] else None

            # Pass 1: every point (or, adaptive, the lattice + the cells near the boundary).
            cache = None  # (trunk, flat indices) when the whole image came in one chunk: reused in pass 2
            if stride >= 2:
                assert size is not None
                prior_b = prior_logits[bi] if prior_logits is not None else None
                self._adaptive_pass1(pass1, size, stride, bi, coarse, uncertainty, prior_b)
            else:
                cache = pass1_rows() if basis is not None else pass1(torch.arange(n, device=dev))
            cache_pos = None
            if cache is not None and refine:  # position of every flat index in the cached trunk
                cache_pos = torch.empty(n, dtype=torch.long, device=dev)
                cache_pos[cache[1]] = torch.arange(n, device=dev)
            fine[bi] = coarse[bi]
            if uncertainty is None or selected is None:
                continue

            # Top-k per image and class, then pass 2 over the selected points only.
            sel_b = select_topk(uncertainty[bi], k, skip_zero=self.mode == "paper")  # (C, N)
            selected[bi] = sel_b
            union = sel_b.any(dim=0).nonzero().squeeze(1)
            for start in range(0, union.numel(), chunk):
                idx = union[start : start + chunk]
                pts = self._points(size, coords, bi, idx)
                if cache is not None and cache_pos is not None:
                    trunk = cache[0][cache_pos[idx]]
                else:
                    trunk = self._trunk_fast(first_c, u_flat, pts, idx, geo, trunk_layers)
                pre_f = self._first_layer_fast(first_f, u_flat, pts, idx, geo)
                for c in range(c_cls):
                    rows = sel_b[c, idx]
                    if not bool(rows.any()):
                        continue
                    if bool(rows.all()):  # e.g. one class: no row selection (a masked copy costs more)
                        trunk_c, pre_c, idx_c = trunk, pre_f, idx
                    else:
                        trunk_c, pre_c, idx_c = trunk[rows], pre_f[rows], idx[rows]
                    # the coarse-feature columns of the head, at the selected points only
                    feat = _linear(trunk_c, w_feat[c], b_feat[c], relu=False)
                    x = _run_layers(torch.addmm(pre_c, feat, wf_c_t).relu_(), fine_rest[c])
                    fine[bi, c, idx_c] = x[:, 0].float()
        return ImplicitOutput(coarse, fine, uncertainty, selected)

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

    @staticmethod
    def _first_layer(
        pe: torch.Tensor,
        w_u: torch.Tensor,
        w_p: torch.Tensor,
        w_g: torch.Tensor,
        bias: torch.Tensor,
        grid: tuple[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype = torch.float32,
    ) -> _FirstLayer:
        """A first layer's :class:`_FirstLayer` for one image (``pe`` (Cp, h', w')), its table computed in fp32
        and stored, like the weights, in the compute ``dtype``."""
        with torch.autocast(pe.device.type, enabled=False):
            parts = [pe.float().reshape(pe.shape[0], -1).t() @ w_p.t()]
            if grid is not None:
                parts += [grid[0], grid[1]]
            table = torch.cat(parts)
        return _FirstLayer(table.to(dtype), w_u.to(dtype), torch.cat((w_u, w_g), 1).to(dtype), bias.to(dtype))

    def _separable_tables(
        self, hh: int, ww: int, w_g: torch.Tensor, bias: torch.Tensor, dev: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row table R (H, D) and column table Cc (W, D) with W_g gamma(y_i, x_j) + b = R[i] + Cc[j].

        Valid because every encoding column depends on one coordinate only:
        gamma(y, x) = gamma(y, x_0) + gamma(y_0, x) - gamma(y_0, x_0).
        """
        corner = self.config.corner_aligned_encoding
        ys = flat_index_coords(torch.arange(hh, device=dev) * ww, hh, ww, corner_aligned=corner)  # (H, 2) x = x_0
        xs = flat_index_coords(torch.arange(ww, device=dev), hh, ww, corner_aligned=corner)  # (W, 2) y = y_0
        enc = self.encoding
        row = enc(ys) @ w_g.t() + bias
        col_full = enc(xs) @ w_g.t()
        col = col_full - col_full[:1]
        return row, col

    @staticmethod
    def _points(
        size: tuple[int, int] | None, coords: torch.Tensor | None, bi: int, idx: torch.Tensor
    ) -> torch.Tensor:
        if size is not None:
            return flat_index_coords(idx, size[0], size[1])
        assert coords is not None
        return coords[bi, idx].float()

    def _first_layer_fast(
        self,
        layer: _FirstLayer,
        u_flat: torch.Tensor,
        pts: torch.Tensor,
        idx: torch.Tensor,
        geo: _FastGeometry,
    ) -> torch.Tensor:
        """Pre-activation of a first layer at points (n, D).

        The PE part (and, for grids, the encoding + bias) is one ``embedding_bag`` over ``layer.table``: the
        bilinear taps of the projected low-resolution PE map, plus the row and column tables. The U part is
        sampled at the points first (``Cf`` = 32 channels, four taps) and projected by a GEMM, which is cheaper
        than a projected U table once the output has about as many points as U has pixels.
        """
        size, hw_u, hw_p, rows_p, grid_tables = geo
        ip, wp = bilinear_taps(pts, *hw_p)
        parts_i = [ip]
        parts_w = [wp]
        if grid_tables:
            assert size is not None
            i = torch.div(idx, size[1], rounding_mode="floor")
            j = idx - i * size[1]
            parts_i.append(torch.stack((i + rows_p, j + rows_p + size[0]), dim=1))
            parts_w.append(torch.ones(len(idx), 2, device=pts.device))
        index = torch.cat(parts_i, dim=1)
        weight = torch.cat(parts_w, dim=1).to(layer.table.dtype)
        pre = F.embedding_bag(index, layer.table, per_sample_weights=weight, mode="sum")
        iu, wu = bilinear_taps(pts, *hw_u)
        u = F.embedding_bag(iu, u_flat, per_sample_weights=wu.to(u_flat.dtype), mode="sum")  # (n, Cf)
        if grid_tables:  # in place: no copy of the (n, D) buffer
            return pre.addmm_(u, layer.w_u.t())
        gam = self.encoding(self._encoding_coords(size, pts, idx)).to(pre.dtype)
        return pre.add_(layer.bias).addmm_(torch.cat((u, gam), dim=1), layer.w_ug.t())

    def _trunk_fast(self, layer: _FirstLayer, u_flat: torch.Tensor, pts: torch.Tensor, idx: torch.Tensor,
                    geo: _FastGeometry, layers: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> torch.Tensor:
        """Coarse trunk output at points: the fast first layer, then ``layers`` (the other folded layers)."""
        return _run_layers(self._first_layer_fast(layer, u_flat, pts, idx, geo).relu_(), layers)


def sample_training_points(
    mask: torch.Tensor,
    n_points: int,
    boundary_fraction: float = 0.5,
    generator: torch.Generator | None = None,
    boundary_width: int = 1,
    boxes: torch.Tensor | None = None,
    box_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample query points for training the implicit decoder on a subset of pixels.

    ``mask`` (B, 1, H, W) (binary or integer label map). Returns ``coords`` (B, N, 2) at pixel centres, (y, x),
    normalised as in :mod:`imedsam.decoders.coords`, and ``targets`` (B, N) float, the mask values there.
    ``round(N * boundary_fraction)`` points per image are drawn uniformly (with replacement) from the boundary band
    (pixels whose ``2 * boundary_width + 1`` square neighbourhood is not constant, i.e. dilation minus erosion);
    then ``round(N * box_fraction)`` uniformly from the pixels inside the prompt box (``boxes`` (B, 4) half-open
    xyxy boxes on the mask grid, :mod:`imedsam.data.prompts`), where a box prompt is ambiguous (the background
    between or around objects inside it); the rest uniformly from the whole image. An image without a boundary
    (empty or full mask) uses uniform points instead of band points. Reproducible with ``generator``; with
    ``box_fraction=0`` the draws are those of a call without boxes.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ImedsamError(f"sample_training_points: mask must be (B, 1, H, W); got {tuple(mask.shape)}")
    if n_points < 1 or not 0.0 <= boundary_fraction <= 1.0 or boundary_width < 1:
        raise ImedsamError(
            f"sample_training_points: need n_points >= 1, 0 <= boundary_fraction <= 1, boundary_width >= 1; "
            f"got {n_points}, {boundary_fraction}, {boundary_width}"
        )
    if not 0.0 <= box_fraction <= 1.0 - boundary_fraction or (box_fraction > 0 and boxes is None):
        raise ImedsamError(
            f"sample_training_points: need boxes and 0 <= box_fraction <= 1 - boundary_fraction; got "
            f"box_fraction={box_fraction}, boundary_fraction={boundary_fraction}, boxes={'none' if boxes is None else 'given'}"
        )
    b, _, hh, ww = mask.shape
    dev = mask.device
    m = mask.float()
    k = 2 * boundary_width + 1
    dil = F.max_pool2d(m, k, stride=1, padding=boundary_width)
    ero = -F.max_pool2d(-m, k, stride=1, padding=boundary_width)
    band = (dil != ero).reshape(b, hh * ww)
    n_band = int(round(n_points * boundary_fraction))
    n_box = int(round(n_points * box_fraction))
    flat_mask = m.reshape(b, hh * ww)
    all_idx = []
    for bi in range(b):
        uni = torch.randint(0, hh * ww, (n_points,), generator=generator, device=dev)
        band_idx = band[bi].nonzero().squeeze(1)
        if n_band > 0 and band_idx.numel() > 0:
            pick = torch.randint(0, band_idx.numel(), (n_band,), generator=generator, device=dev)
            uni = torch.cat((band_idx[pick], uni[n_band:]))
        if n_box > 0:
            assert boxes is not None
            x0, y0, x1, y1 = boxes[bi].tolist()  # half-open: pixels x0 <= x < x1, y0 <= y < y1
            x0, x1 = (min(max(int(round(v)), 0), ww - 1) for v in (x0, x1 - 1))
            y0, y1 = (min(max(int(round(v)), 0), hh - 1) for v in (y0, y1 - 1))
            ys = torch.randint(y0, max(y1, y0) + 1, (n_box,), generator=generator, device=dev)
            xs = torch.randint(x0, max(x1, x0) + 1, (n_box,), generator=generator, device=dev)
            uni = torch.cat((uni[:n_band], ys * ww + xs, uni[n_band + n_box :]))
        all_idx.append(uni)
    index = torch.stack(all_idx)  # (B, N)
    coords = flat_index_coords(index.reshape(-1), hh, ww).reshape(b, n_points, 2)
    targets = torch.gather(flat_mask, 1, index)
    return coords, targets
