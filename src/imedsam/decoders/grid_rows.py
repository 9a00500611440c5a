"""The first Linear (+ ReLU) of an implicit-decoder MLP on whole rows of an output grid, as one GEMM per block.

On an ``H x W`` output grid the first layer's pre-activation at pixel (y, x) is (:mod:`imedsam.decoders.implicit`)::

    a(y, x) = W_U U(y, x) + W_PE PE(y, x) + W_g gamma(y, x) + b

with U and PE sampled bilinearly (``align_corners=False``, border clamping) and a separable encoding gamma
(every column depends on one coordinate). Bilinear sampling is separable too: along x it is a fixed
``(W, w)`` interpolation matrix ``M_x``, along y it mixes two rows of the map. So for one output row y::

    a(y, .) = M_x^PE P_y + M_x^U V_y + D_x W_g'^T + 1 r_y^T            (W, D)
            = A B_y,   A = [M_x^PE | M_x^U | D_x | 1]  (W, K),   B_y = [P_y ; V_y ; W_g'^T ; r_y^T]  (K, D)

* ``P_y`` (w', D): the PE map projected by ``W_PE`` at low resolution and interpolated along y;
* ``V_y`` (w, D): U interpolated along y, projected by ``W_U``;
* ``D_x`` (W, G'): the encoding columns that vary with x, minus their value at x_0 (columns that depend on y
  only are dropped: they are 0 there); ``W_g'`` the matching weight columns;
* ``r_y`` (D,): ``W_g gamma(y, x_0) + b``, the y part of the encoding plus the bias.

``A`` is the same for every row, image and MLP (:class:`GridBasis`); a block of rows y_0..y_{R-1} is then ONE
matrix product ``A [B_{y_0} | ... | B_{y_{R-1}}]`` of shape (W, R D) with the ReLU fused (oneDNN on CPU), read
as (W, R, D): points in x-major order. It replaces per-pixel interpolation taps (six 1024-wide rows gathered
per pixel), the U projection and the separate ReLU pass: about 3x less time for the 1024-wide coarse layer of
a 384^2 grid in bf16 on 2 CPU cores. In fp32 the dense product (K times more multiply-adds than taps) is slower
than the taps there, so the decoder uses it in bf16/fp16 only (``ImplicitDecoderConfig.row_gemm``). ``K``
(about 150 for the defaults: 24 + 96 + 21 + 1) is padded to a multiple of 16 with zero columns (oneDNN's bf16
kernels are much faster on aligned K).

The values equal the per-point path up to float rounding (the interpolation weights and ``D_x`` enter the
product in the compute dtype; in bf16 they round like the feature tables already do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imedsam.decoders.coords import flat_index_coords, linear_interp_matrix
from imedsam.sam.dense import linear

__all__ = ["GridBasis", "GridFirstLayer"]

_K_ALIGN = 16


@dataclass(frozen=True)
class GridBasis:
    """What an ``H x W`` output grid shares across images and MLPs.

    ``a`` (W, K) in the compute dtype: ``[M_x^PE | M_x^U | D_x | 1 | 0]``; ``my_pe`` (H, h') and ``my_u``
    (H, h) fp32: the y interpolation matrices; ``enc_x_cols`` (G',) the encoding columns that vary with x.
    Features are sampled at pixel centres; the encoding is evaluated at pixel centres or, with
    ``corner_aligned``, at the official linspace grid.
    """

    size: tuple[int, int]
    a: torch.Tensor
    my_pe: torch.Tensor
    my_u: torch.Tensor
    enc_x_cols: torch.Tensor

    @classmethod
    def build(cls, size: tuple[int, int], hw_pe: tuple[int, int], hw_u: tuple[int, int], encoding: nn.Module,
              corner_aligned: bool, dtype: torch.dtype, device: torch.device) -> GridBasis:
        hh, ww = size
        with torch.autocast(device.type, enabled=False):
            ys = flat_index_coords(torch.arange(hh, device=device) * ww, hh, ww)[:, 0]  # pixel centres
            xs = flat_index_coords(torch.arange(ww, device=device), hh, ww)[:, 1]
            enc_xs = flat_index_coords(torch.arange(ww, device=device), hh, ww, corner_aligned=corner_aligned)
            enc_x = encoding(enc_xs)  # (W, G) at y = y_0
            delta = enc_x - enc_x[:1]
            cols = (delta != 0).any(0).nonzero().squeeze(1)
            parts = [linear_interp_matrix(xs, hw_pe[1]), linear_interp_matrix(xs, hw_u[1]), delta[:, cols],
                     torch.ones(ww, 1, device=device)]
            k = sum(p.shape[1] for p in parts)
            parts.append(torch.zeros(ww, -k % _K_ALIGN, device=device))
            a = torch.cat(parts, dim=1).to(dtype).contiguous()
            return cls(size, a, linear_interp_matrix(ys, hw_pe[0]), linear_interp_matrix(ys, hw_u[0]), cols)

    def block_index(self, r0: int, r1: int) -> torch.Tensor:
        """Row-major flat pixel indices of rows ``[r0, r1)`` in the x-major order of :meth:`GridFirstLayer.rows`."""
        ww = self.size[1]
        rows = torch.arange(r0, r1, device=self.a.device)
        return (rows[None, :] * ww + torch.arange(ww, device=self.a.device)[:, None]).reshape(-1)


class GridFirstLayer:
    """One image's first layer ``W [U || PE || gamma] + b`` (BN folded) on grid rows; see the module docstring.

    The caller passes the parts it already has for the per-point path: ``pe_proj`` (h', w', D), the PE map
    projected by ``W_PE`` at low resolution; ``row_table`` (H, D), ``r_y = W_g gamma(y, x_0) + b`` for every row
    (the encoding at x_0 of the same grid convention as ``basis``); ``u`` (Cf, h, w) the image's features and
    ``w_u`` (D, Cf), ``w_g`` (D, G) the weights of U and of the encoding. The per-block products run in ``dtype``.
    """

    def __init__(self, basis: GridBasis, pe_proj: torch.Tensor, u: torch.Tensor, w_u: torch.Tensor,
                 w_g: torch.Tensor, row_table: torch.Tensor, dtype: torch.dtype) -> None:
        self.basis = basis
        self.dtype = dtype
        self.dim = w_u.shape[0]
        wp = pe_proj.shape[1]
        self.pe_cols = pe_proj.permute(1, 0, 2).to(dtype).contiguous()  # (w', h', D)
        self.u_cols = u.permute(2, 1, 0).to(dtype).contiguous()  # (w, h, Cf)
        self.row_table = row_table.to(dtype)  # (H, D): r_y
        self.w_gx = w_g[:, basis.enc_x_cols].t().to(dtype)  # (G', D)
        self.w_u_t = w_u.t().to(dtype).contiguous()  # (Cf, D)
        # row offsets of the parts of B^T = [P ; V ; W_g'^T ; r ; 0] (K, R D), see :meth:`_weights`
        self.k_v, self.k_g = wp, wp + self.u_cols.shape[0]
        self.k_one = self.k_g + self.w_gx.shape[0]
        self._buffers: dict[int, torch.Tensor] = {}

    def _weights(self, n: int) -> torch.Tensor:
        """The (K, n D) buffer of a block of ``n`` rows, its row-independent parts (``W_g'^T``, zero padding)
        written once."""
        buf = self._buffers.get(n)
        if buf is None:
            k = self.basis.a.shape[1]
            buf = torch.zeros(k, n, self.dim, dtype=self.dtype, device=self.w_u_t.device)
            buf[self.k_g : self.k_one] = self.w_gx[:, None, :]
            self._buffers[n] = buf
        return buf

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """``relu(a(y, x))`` for the rows ``[r0, r1)``: (W * (r1 - r0), D) in x-major order
        (:meth:`GridBasis.block_index` gives their flat pixel indices)."""
        basis, n = self.basis, r1 - r0
        buf = self._weights(n)  # (K, n, D): B_y^T for every row y of the block, side by side
        with torch.autocast(self.w_u_t.device.type, enabled=False):
            my_pe = basis.my_pe[r0:r1].to(self.dtype).expand(self.pe_cols.shape[0], -1, -1)  # (w', n, h')
            torch.bmm(my_pe, self.pe_cols, out=buf[: self.k_v])  # P_y[j] = sum_i My[y, i] W_PE PE[i, j]
            my_u = basis.my_u[r0:r1].to(self.dtype).expand(self.u_cols.shape[0], -1, -1)  # (w, n, h)
            u_y = torch.bmm(my_u, self.u_cols)  # (w, n, Cf): U interpolated along y
            torch.mm(u_y.reshape(-1, u_y.shape[-1]), self.w_u_t, out=buf[self.k_v : self.k_g].view(-1, self.dim))
            buf[self.k_one] = self.row_table[r0:r1]
            out = linear(basis.a, buf.view(buf.shape[0], -1).t(), None, relu=True)  # (W, n D)
        return out.reshape(-1, self.dim)
