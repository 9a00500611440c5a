"""I-MedSAM's implicit segmentation decoder: coarse INR, uncertainty-guided sampling (UGS), fine INR.

Files: this module (the module, its plain training path, the training-point sampler),
:mod:`~imedsam.decoders.implicit_config` (options and output), :mod:`~imedsam.decoders.ugs` (MC variance, top-k),
:mod:`~imedsam.decoders.implicit_fast` (the inference path) and :mod:`~imedsam.decoders.implicit_adaptive`
(adaptive grid decoding); the last two are mixins of :class:`ImplicitDecoder`.

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
* pass 1 runs over all points in chunks of ``chunk_size`` points per image (default: what fits the CPU's
  last-level cache, :func:`~imedsam.decoders.implicit_config.decode_chunk`; with ``row_gemm``: blocks of
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

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.decoders.coords import (
    PaperEncoding,
    ReferenceEncoding,
    flat_index_coords,
    grid_coords,
    sample_features,
)
from imedsam.decoders.implicit_adaptive import AdaptiveGrid
from imedsam.decoders.implicit_config import ImplicitDecoderConfig, ImplicitOutput, Mode
from imedsam.decoders.implicit_fast import FastInference
from imedsam.decoders.ugs import mc_variance, select_topk
from imedsam.errors import ImedsamError
from imedsam.sam.dense import Linear

__all__ = [
    "ImplicitDecoder",
    "ImplicitDecoderConfig",
    "ImplicitOutput",
    "sample_training_points",
    "mc_variance",
    "select_topk",
]

logger = logging.getLogger(__name__)


def _mlp(in_dim: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    return nn.Sequential(*layers)

class ImplicitDecoder(FastInference, AdaptiveGrid, nn.Module):
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
            Linear(trunk_out, 1 + cfg.coarse_feature_dim) for _ in range(cfg.num_classes)
        )
        self.fine_trunk = _mlp(self.fine_in_dim, cfg.fine_hidden[:-1])
        head_in, head_hidden = cfg.fine_hidden[-2], cfg.fine_hidden[-1]
        self.fine_heads = nn.ModuleList(
            nn.Sequential(
                Linear(head_in, head_hidden),
                nn.BatchNorm1d(head_hidden),
                nn.ReLU(inplace=True),
                Linear(head_hidden, 1),
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
            f"box_fraction={box_fraction}, boundary_fraction={boundary_fraction}, "
            f"boxes={'none' if boxes is None else 'given'}"
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
    # draws happen on the generator's device (a CPU generator may drive CUDA masks), then move to the mask's
    gen_dev = generator.device if generator is not None else dev

    def randint(low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=generator, device=gen_dev).to(dev)

    all_idx = []
    for bi in range(b):
        uni = randint(0, hh * ww, n_points)
        band_idx = band[bi].nonzero().squeeze(1)
        if n_band > 0 and band_idx.numel() > 0:
            pick = randint(0, band_idx.numel(), n_band)
            uni = torch.cat((band_idx[pick], uni[n_band:]))
        if n_box > 0:
            assert boxes is not None
            x0, y0, x1, y1 = boxes[bi].tolist()  # half-open: pixels x0 <= x < x1, y0 <= y < y1
            x0, x1 = (min(max(int(round(v)), 0), ww - 1) for v in (x0, x1 - 1))
            y0, y1 = (min(max(int(round(v)), 0), hh - 1) for v in (y0, y1 - 1))
            ys = randint(y0, max(y1, y0) + 1, n_box)
            xs = randint(x0, max(x1, x0) + 1, n_box)
            uni = torch.cat((uni[:n_band], ys * ww + xs, uni[n_band + n_box :]))
        all_idx.append(uni)
    index = torch.stack(all_idx)  # (B, N)
    coords = flat_index_coords(index.reshape(-1), hh, ww).reshape(b, n_points, 2)
    targets = torch.gather(flat_mask, 1, index)
    return coords, targets
