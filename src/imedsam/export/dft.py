"""I-MedSAM's frequency image as matrix products, for the ONNX export.

:func:`imedsam.peft.frequency.frequency_image` takes ``|fftshift(FFT2(gray))|`` over the un-padded region of the
encoder input. The TorchScript ONNX exporter has no symbolic for ``torch.fft`` (``aten::fft_fft2``), and the
dynamo exporter (which maps it to ONNX ``DFT`` through onnxscript) would need the region's size fixed at export,
while it changes with every image's aspect ratio. Here the same function is written with ops every exporter and
runtime has: the shifted 2-D DFT of the ``vh x vw`` region is ``M_h G M_w^T`` with the ``S x S`` matrices

    M_n[k, j] = exp(-2 pi i ((k - n // 2) * j mod n) / n)    for k, j < n, else 0

(``fftshift`` folded into the row index: output ``k`` is frequency ``k - n // 2``; the product is reduced modulo
``n`` in integers, so every angle is in ``[0, 2 pi)`` and float32 keeps its precision). The region's size
``valid_hw`` is a graph input; rows and columns past it are zero, the min-max runs over the region only and the
padding is set to 0, as :func:`~imedsam.peft.frequency.frequency_image` does. The cost is six ``S^3`` matrix
products (0.1 GMAC at S = 256, 6.4 at S = 1024), small beside the encoder. Values agree with ``torch.fft`` to
float32 rounding (tests/export).
"""

from __future__ import annotations

import math

import torch

from imedsam.peft.frequency import FrequencyStream


def shifted_dft_matrices(size: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts ``(size, size)`` float32 of the shifted DFT matrix of length ``n`` (a 0-d int64
    tensor, ``1 <= n <= size``), zero outside the leading ``n x n`` block (module docstring)."""
    k = torch.arange(size, dtype=torch.int64)
    shift = torch.div(n, 2, rounding_mode="floor")
    turns = torch.remainder((k[:, None] - shift) * k[None, :], n)  # (size, size) integers in [0, n)
    angle = turns.to(torch.float32) * (2 * math.pi) / n.to(torch.float32)
    inside = ((k[:, None] < n) & (k[None, :] < n)).to(torch.float32)
    return torch.cos(angle) * inside, -torch.sin(angle) * inside


def dft_frequency_image(images: torch.Tensor, valid_hw: torch.Tensor, *, reference: bool = False,
                        log_amplitude: bool = True) -> torch.Tensor:
    """:func:`~imedsam.peft.frequency.frequency_image` of a batch sharing one un-padded region.

    Args:
        images: ``(B, C, S, S)`` encoder input.
        valid_hw: ``(2,)`` int64 tensor, the un-padded ``(h, w)`` (top-left) inside ``S x S``.
        reference, log_amplitude: as :func:`~imedsam.peft.frequency.frequency_image` (``"backward"`` FFT norm in
            reference mode, ``"forward"`` otherwise).

    Returns:
        ``(B, 3, S, S)`` float32 in ``[0, 1]``, 0 in the padding.
    """
    size = images.shape[-1]
    x = images.float()
    gray = x[:, 0] * 255.0 if reference else x.mean(dim=1)  # (B, S, S)
    vh, vw = valid_hw[0], valid_hw[1]
    h_re, h_im = shifted_dft_matrices(size, vh)
    w_re, w_im = shifted_dft_matrices(size, vw)
    a_re, a_im = h_re @ gray, h_im @ gray  # M_h G
    y_re = a_re @ w_re.T - a_im @ w_im.T  # (M_h G) M_w^T, complex
    y_im = a_re @ w_im.T + a_im @ w_re.T
    amp = torch.sqrt(y_re * y_re + y_im * y_im)
    if not reference:  # "forward" norm: divided by the number of samples
        amp = amp / (vh * vw).to(torch.float32)
    if log_amplitude:
        amp = torch.log1p(amp)
    rows = torch.arange(size, dtype=torch.int64)
    inside = (rows[:, None] < vh) & (rows[None, :] < vw)  # (S, S)
    flat = amp.flatten(1)
    lo = torch.where(inside.flatten(), flat, torch.full_like(flat, math.inf)).amin(dim=1)[:, None, None]
    hi = torch.where(inside.flatten(), flat, torch.full_like(flat, -math.inf)).amax(dim=1)[:, None, None]
    span = hi - lo
    out = torch.where(span > 0, (amp - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(amp))
    out = out * inside.to(out.dtype)
    return out.unsqueeze(1).expand(-1, 3, -1, -1)


class DftFrequencyStream(FrequencyStream):
    """:class:`~imedsam.peft.frequency.FrequencyStream` whose frequency image is :func:`dft_frequency_image`;
    ``valid_hw`` (``ctx.valid_hw``) must then be a ``(2,)`` int64 tensor."""

    def image(self, images: torch.Tensor, valid_hw) -> torch.Tensor:
        return dft_frequency_image(images, valid_hw, reference=self.reference, log_amplitude=self.log_amplitude)

    @classmethod
    def replacing(cls, stream: FrequencyStream) -> DftFrequencyStream:
        """The DFT stream with the options of ``stream``."""
        return cls(reference=stream.reference, log_amplitude=stream.log_amplitude)
