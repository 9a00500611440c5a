"""frequency_image and FrequencyAdapter: analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.peft.frequency import FrequencyAdapter, frequency_image


def _images(b: int = 2, h: int = 16, w: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reference", [False, True])
def test_shape_range_dtype_replicated(reference: bool) -> None:
    x = _images()
    f = frequency_image(x, reference=reference)
    assert f.shape == x.shape and f.dtype == torch.float32 and not f.requires_grad
    assert f.min() >= 0 and f.max() <= 1
    for i in range(2):  # per-image min-max: every image reaches 0 and 1
        assert f[i].min() == 0 and f[i].max() == 1
    assert torch.equal(f[:, 0], f[:, 1]) and torch.equal(f[:, 0], f[:, 2])


def test_dc_at_centre_after_fftshift() -> None:
    x = _images(h=16, w=20) + 1.0  # large positive mean: DC is the largest amplitude
    for log in (False, True):
        f = frequency_image(x, log_amplitude=log)
        flat = f[:, 0].flatten(1).argmax(dim=1)
        assert flat.tolist() == [8 * 20 + 10] * 2  # (H//2, W//2)


def test_matches_numpy_reference_pipeline() -> None:
    x = _images(b=1, h=12, w=12)
    gray = x[0].mean(0).numpy().astype(np.float64)
    amp = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(gray))) / gray.size)  # "forward" norm
    amp = (amp - amp.min()) / (amp.max() - amp.min())
    torch.testing.assert_close(frequency_image(x)[0, 0], torch.from_numpy(amp).float(), rtol=1e-4, atol=1e-5)


def test_reference_uses_channel_zero_only() -> None:
    x = _images()
    y = x.clone()
    y[:, 1:] = torch.rand_like(y[:, 1:])  # change G and B only
    assert torch.equal(frequency_image(x, reference=True), frequency_image(y, reference=True))
    assert not torch.allclose(frequency_image(x), frequency_image(y))
    # reference (no log) == paper grayscale applied to an image whose channels all equal channel 0
    r = x[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(frequency_image(x, reference=True), frequency_image(r, log_amplitude=False),
                               rtol=1e-4, atol=1e-5)


def test_invariant_to_scale_and_offset_without_log() -> None:
    x = _images()
    a = frequency_image(x, log_amplitude=False)
    b = frequency_image(3.0 * x, log_amplitude=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # an offset changes only the DC bin
    c = frequency_image(x + 0.5, log_amplitude=False)
    d = frequency_image(x + 0.7, log_amplitude=False)
    mask = torch.ones(16, 20, dtype=torch.bool)
    mask[8, 10] = False
    assert (c[:, 0, 8, 10] == 1).all() and (d[:, 0, 8, 10] == 1).all()
    # min-max over the non-DC bins changes with the DC peak, but the relative pattern is the same
    cc, dd = c[:, 0][:, mask], d[:, 0][:, mask]
    torch.testing.assert_close(cc / cc.amax(1, keepdim=True), dd / dd.amax(1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_valid_region_ignores_padding() -> None:
    x = _images(b=2, h=16, w=16)
    padded = torch.zeros(2, 3, 24, 24)
    padded[:, :, :16, :16] = x
    padded[:, :, 16:, :] = 5.0  # whatever the padding holds must not matter
    f = frequency_image(padded, valid_hw=(16, 16))
    assert torch.equal(f[:, :, 16:], torch.zeros_like(f[:, :, 16:]))
    assert torch.equal(f[:, :, :, 16:], torch.zeros_like(f[:, :, :, 16:]))
    torch.testing.assert_close(f[:, :, :16, :16], frequency_image(x))
    # one region per image
    g = frequency_image(padded, valid_hw=[(16, 16), (10, 12)])
    torch.testing.assert_close(g[1, :, :10, :12], frequency_image(padded[1:, :, :10, :12])[0])
    assert g[1, :, 10:].abs().sum() == 0 and g[1, :, :, 12:].abs().sum() == 0


def test_constant_image_and_dtype() -> None:
    f = frequency_image(torch.zeros(1, 3, 8, 8))
    assert torch.equal(f, torch.zeros(1, 3, 8, 8))
    g = frequency_image(_images().to(torch.bfloat16))
    assert g.dtype == torch.bfloat16


def test_no_grad_on_input() -> None:
    x = _images().requires_grad_(True)
    assert not frequency_image(x).requires_grad


@pytest.mark.parametrize("bad", [torch.zeros(3, 8, 8), torch.zeros(1, 0, 8, 8)])
def test_bad_shape(bad: torch.Tensor) -> None:
    with pytest.raises(ImedsamError):
        frequency_image(bad)


def test_bad_valid_hw() -> None:
    with pytest.raises(ImedsamError):
        frequency_image(_images(), valid_hw=(32, 8))
    with pytest.raises(ImedsamError):
        frequency_image(_images(b=2), valid_hw=[(8, 8)] * 3)


def test_adapter_formula_and_parameters() -> None:
    torch.manual_seed(0)
    fa = FrequencyAdapter(8, hidden=4, scale=0.5)
    f = torch.randn(2, 3, 3, 8)
    z = torch.nn.functional.layer_norm(f, (8,), eps=1e-6)
    expected = z + fa.up(torch.nn.functional.gelu(fa.down(z)))
    torch.testing.assert_close(fa.step(f), expected)
    assert fa.scale == 0.5 and fa.norm.eps == 1e-6
    assert sum(p.numel() for p in fa.parameters() if p.requires_grad) == (8 * 4 + 4) + (4 * 8 + 8) + 2 * 8
    frozen = FrequencyAdapter(8, norm_trainable=False)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == (8 * 4 + 4) + (4 * 8 + 8)
    no_skip = FrequencyAdapter(8, skip=False)
    torch.testing.assert_close(no_skip.step(f), no_skip.up(torch.nn.functional.gelu(no_skip.down(no_skip.norm(f)))))
