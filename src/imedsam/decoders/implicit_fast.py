"""The implicit decoder's inference path (``model.eval()``): BatchNorm folded, the prompt-PE part of the first
layers applied at low resolution and interpolated, whole grids decoded a block of rows at a time as one GEMM
(:mod:`imedsam.decoders.grid_rows`), other points through ``embedding_bag`` taps, chunked, fused Linear + ReLU.
The same values as the plain module path up to float rounding (the module docstring of
:mod:`imedsam.decoders.implicit` describes every step; tests compare the two paths).

:class:`FastInference` is a mixin of :class:`~imedsam.decoders.implicit.ImplicitDecoder`: its methods use the
decoder's modules and options.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.decoders.coords import (
    bilinear_taps,
    flat_index_coords,
)
from imedsam.decoders.grid_rows import GridBasis, GridFirstLayer
from imedsam.decoders.implicit_config import ImplicitOutput, decode_chunk
from imedsam.sam.dense import linear as _linear
from imedsam.decoders.ugs import mc_variance, select_topk

logger = logging.getLogger("imedsam.decoders.implicit")

#: At most this many points per row block of the first-layer GEMM (:mod:`imedsam.decoders.grid_rows`): its
#: (points, 1024) output is then about 16 MB in bf16; 4x larger blocks measured 1.5x slower on 2 CPU cores.
_ROW_BLOCK_POINTS = 8192


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


class FastInference:
    """The inference path of :class:`~imedsam.decoders.implicit.ImplicitDecoder` (module docstring)."""

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
        chunk = decode_chunk(cfg, dtype, dev)
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
