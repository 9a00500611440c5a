"""The first layer on whole grid rows as one GEMM (:mod:`imedsam.decoders.grid_rows`) == the per-point formula."""

from __future__ import annotations

import pytest
import torch

from imedsam.decoders.coords import PaperEncoding, ReferenceEncoding, flat_index_coords, grid_coords, sample_features
from imedsam.decoders.grid_rows import GridBasis, GridFirstLayer


def make_layer(basis, u, pe, w, b, encoding, corner_aligned, dtype):
    """The layer from the parts the decoder's per-point path computes: PE projected at low resolution, row table."""
    cf, (cp, hp, wp) = u.shape[0], pe.shape
    pe_proj = (pe.reshape(cp, -1).t() @ w[:, cf : cf + cp].t()).reshape(hp, wp, -1)
    hh, ww = basis.size
    ys = flat_index_coords(torch.arange(hh) * ww, hh, ww, corner_aligned=corner_aligned)  # x = x_0
    row_table = encoding(ys) @ w[:, cf + cp :].t() + b
    return GridFirstLayer(basis, pe_proj, u, w[:, :cf], w[:, cf + cp :], row_table, dtype)


def naive_first_layer(u, pe, encoding, w, b, size, corner_aligned):
    """relu(W [U(p) || PE(p) || gamma(p)] + b) at every pixel, row-major: (H*W, D)."""
    pts = grid_coords(*size)
    enc = encoding(grid_coords(*size, corner_aligned=corner_aligned))
    z = torch.cat((sample_features(u[None], pts[None])[0], sample_features(pe[None], pts[None])[0], enc), 1)
    return (z @ w.t() + b).relu()


@pytest.mark.parametrize("size", [(13, 19), (1, 1), (5, 40), (24, 24)])
@pytest.mark.parametrize(("encoding", "corner_aligned"),
                         [(PaperEncoding(4), False), (ReferenceEncoding(), False), (ReferenceEncoding(), True)])
@pytest.mark.parametrize("step", [1, 3, 100])
def test_rows_equal_the_per_point_first_layer(size, encoding, corner_aligned, step):
    g = torch.Generator().manual_seed(0)
    cf, cp, d = 5, 7, 9
    u, pe = torch.randn(cf, 6, 8, generator=g), torch.randn(cp, 3, 4, generator=g)
    w = torch.randn(d, cf + cp + encoding.out_dim, generator=g)
    b = torch.randn(d, generator=g)
    expected = naive_first_layer(u, pe, encoding, w, b, size, corner_aligned)

    basis = GridBasis.build(size, (3, 4), (6, 8), encoding, corner_aligned, torch.float32, torch.device("cpu"))
    assert basis.a.shape[1] % 16 == 0  # K padded for the GEMM kernels
    layer = make_layer(basis, u, pe, w, b, encoding, corner_aligned, torch.float32)
    out = torch.empty_like(expected)
    seen = torch.zeros(size[0] * size[1], dtype=torch.int64)
    for r0 in range(0, size[0], step):
        r1 = min(r0 + step, size[0])
        idx = basis.block_index(r0, r1)
        out[idx] = layer.rows(r0, r1)
        seen[idx] += 1
    assert torch.equal(seen, torch.ones_like(seen))  # every pixel exactly once
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_rows_in_bf16_stay_close():
    g = torch.Generator().manual_seed(1)
    enc = PaperEncoding(10)
    u, pe = torch.randn(32, 24, 24, generator=g), torch.randn(16, 6, 6, generator=g)
    w = torch.randn(64, 32 + 16 + enc.out_dim, generator=g) * 0.1
    b = torch.randn(64, generator=g) * 0.1
    size = (96, 96)
    expected = naive_first_layer(u, pe, enc, w, b, size, False)
    basis = GridBasis.build(size, (6, 6), (24, 24), enc, False, torch.bfloat16, torch.device("cpu"))
    layer = make_layer(basis, u, pe, w, b, enc, False, torch.bfloat16)
    out = torch.empty_like(expected)
    out[basis.block_index(0, 96)] = layer.rows(0, 96).float()
    assert (out - expected).abs().max() < 0.015 * expected.abs().max()  # bf16 rounding: about 0.5 %
