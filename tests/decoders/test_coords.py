"""Pixel-centre coordinates, bilinear sampling and the two Fourier encodings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imedsam.decoders.coords import (
    PaperEncoding,
    ReferenceEncoding,
    bilinear_taps,
    flat_index_coords,
    grid_coords,
    linear_interp_matrix,
    sample_features,
)
from imedsam.errors import ImedsamError


def test_grid_coords_pixel_centres_yx_order():
    c = grid_coords(2, 3)
    assert c.shape == (6, 2) and c.dtype == torch.float32
    expected = torch.tensor(
        [[-0.5, -2 / 3], [-0.5, 0.0], [-0.5, 2 / 3], [0.5, -2 / 3], [0.5, 0.0], [0.5, 2 / 3]]
    )
    torch.testing.assert_close(c, expected)
    assert torch.equal(grid_coords(1, 1), torch.zeros(1, 2))
    big = grid_coords(2048, 2048)
    assert big.shape == (2048 * 2048, 2)
    assert big.min() > -1 and big.max() < 1


def test_grid_coords_corner_aligned_is_linspace():
    c = grid_coords(5, 4, corner_aligned=True).reshape(5, 4, 2)
    torch.testing.assert_close(c[:, 0, 0], torch.linspace(-1, 1, 5))
    torch.testing.assert_close(c[0, :, 1], torch.linspace(-1, 1, 4))
    assert torch.equal(grid_coords(1, 1, corner_aligned=True), torch.full((1, 2), -1.0))


def test_flat_index_subset_is_bitwise_equal():
    full = grid_coords(17, 23, dtype=torch.float64)
    idx = torch.tensor([0, 5, 22, 23, 200, 17 * 23 - 1])
    assert torch.equal(flat_index_coords(idx, 17, 23, dtype=torch.float64), full[idx])


def test_bad_size_raises():
    with pytest.raises(ImedsamError):
        grid_coords(0, 3)


@pytest.mark.parametrize("out_size", [(17, 23), (1, 1), (3, 2), (40, 9)])
def test_sample_features_matches_interpolate(out_size):
    torch.manual_seed(0)
    feat = torch.randn(2, 5, 6, 7)
    h, w = out_size
    pts = grid_coords(h, w).unsqueeze(0).expand(2, -1, -1)
    got = sample_features(feat, pts).transpose(1, 2).reshape(2, 5, h, w)
    ref = F.interpolate(feat, size=out_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sample_features_broadcasts_batch_one():
    feat = torch.randn(1, 3, 4, 4)
    pts = torch.rand(3, 10, 2) * 2 - 1
    out = sample_features(feat, pts)
    assert out.shape == (3, 10, 3)
    torch.testing.assert_close(out[1], sample_features(feat, pts[1:2])[0])


def test_bilinear_taps_equal_grid_sample():
    torch.manual_seed(1)
    feat = torch.randn(1, 8, 5, 9)
    pts = torch.rand(500, 2) * 2.2 - 1.1  # includes points beyond the outer pixel centres (border clamp)
    pts[:4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [-0.999, 0.999]])
    index, weight = bilinear_taps(pts, 5, 9)
    flat = feat[0].reshape(8, -1).t()
    got = (flat[index] * weight.unsqueeze(-1)).sum(1)
    ref = sample_features(feat, pts.unsqueeze(0))[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.sum(1), torch.ones(500))


@pytest.mark.parametrize(("out_len", "length"), [(384, 24), (17, 5), (1, 6), (7, 1), (5, 11)])
def test_linear_interp_matrix_equals_interpolate(out_len, length):
    pos = flat_index_coords(torch.arange(out_len), 1, out_len)[:, 1]  # pixel centres of an out_len axis
    m = linear_interp_matrix(pos, length)
    assert m.shape == (out_len, length) and (m >= 0).all() and (m > 0).sum(1).le(2).all()
    torch.testing.assert_close(m.sum(1), torch.ones(out_len))
    signal = torch.randn(1, 3, length, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(signal, size=out_len, mode="linear", align_corners=False)[0]
    torch.testing.assert_close(signal[0] @ m.t(), expected, atol=1e-6, rtol=1e-5)


def test_paper_encoding_formula_and_order():
    enc = PaperEncoding(num_octaves=10)
    assert enc.out_dim == 42
    p = torch.tensor([[0.3, -0.7]])
    out = enc(p)[0]
    assert out.shape == (42,)
    for k in range(10):
        a = (2**k) * math.pi
        torch.testing.assert_close(
            out[4 * k : 4 * k + 4],
            torch.tensor([math.sin(a * 0.3), math.sin(a * -0.7), math.cos(a * 0.3), math.cos(a * -0.7)]),
            atol=1e-4,
            rtol=1e-4,
        )
    torch.testing.assert_close(out[-2:], p[0])
    assert PaperEncoding(4, include_input=False).out_dim == 16
    assert enc(torch.zeros(3, 5, 2)).shape == (3, 5, 42)


def test_reference_encoding_formula_and_order():
    enc = ReferenceEncoding()
    assert enc.out_dim == 63
    p = torch.tensor([[0.25, -0.5]], dtype=torch.float64)
    out = enc.double()(p)[0]
    c = [-1.0, 0.25, -0.5]
    freqs = [2 ** (10 * k / 9) for k in range(10)]
    sin_block = [math.sin(2 * math.pi * f * v) for v in c for f in freqs]
    cos_block = [math.cos(2 * math.pi * f * v) for v in c for f in freqs]
    expected = torch.tensor(sin_block + cos_block + c, dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("enc", [PaperEncoding(), ReferenceEncoding()])
def test_encodings_are_separable(enc):
    # every column depends on one coordinate only: g(y, x) = g(y, x0) + g(y0, x) - g(y0, x0)
    torch.manual_seed(2)
    y, x, y0, x0 = (torch.rand(20, 1, dtype=torch.float64) * 2 - 1 for _ in range(4))
    enc = enc.double()
    g = lambda a, b: enc(torch.cat((a, b), dim=1))  # noqa: E731
    torch.testing.assert_close(g(y, x), g(y, x0) + g(y0, x) - g(y0, x0), atol=1e-9, rtol=0)
    assert enc.separable


def test_encoding_rejects_wrong_shape():
    with pytest.raises(ImedsamError):
        PaperEncoding()(torch.zeros(4, 3))
