"""I-MedSAM's frequency branch: the frequency image and the Frequency Adapter (FA).

Frequency image (systems.md §A.4)
---------------------------------
:func:`frequency_image` turns a batch of images ``(B, C, H, W)`` into ``(B, 3, H, W)`` values in ``[0, 1]``:

1. grayscale ``g = mean_c x_c`` (paper mode). ``reference=True`` reproduces the official code's bug
   (systems.md §F.2): ``g = 255 * x_0``, i.e. channel 0 only, scaled by 255;
2. 2-D FFT amplitude ``|FFT2(g)|`` with ``fftshift``, so the DC (zero-frequency) bin sits at index
   ``(H // 2, W // 2)``;
3. optional ``log1p`` compression (default: on in paper mode, off in reference mode). Without it the DC peak
   dominates and almost every other value is ~0 after normalisation;
4. per-image min-max normalisation to ``[0, 1]`` (an image whose amplitude is constant maps to 0);
5. replicated to 3 channels, so it fits the encoder's frozen 3-channel patch embedding.

It runs in torch on the input's device, under ``no_grad``, in float32, and is returned in the input's floating
dtype (the official code went through numpy on the CPU, §F.21). Paper mode uses the ``"forward"`` FFT norm
(coefficients divided by ``H * W``, so the DC bin is the mean intensity and amplitudes do not grow with the
image size; this keeps ``log1p`` comparable across resolutions); reference mode uses numpy's unscaled
``"backward"`` norm. Without ``log1p`` the norm is irrelevant after min-max.

**Which image.** The frequency image is computed from the tensor the encoder receives (after resizing, SAM
pixel normalisation if the model uses it, and padding), never from a separate raw image:

* the frequency tokens go through the *same* frozen patch embedding as the image tokens, so both streams should
  see the same input, and the adapted encoder stays a pure function of its input tensor (image-embedding caches
  and ``Segmenter`` need nothing extra);
* SAM's normalisation is a per-channel affine map with nearly equal standard deviations (58.4, 57.1, 57.4), so
  the grayscale of the normalised input is, up to a constant offset and a constant factor, the grayscale of the
  raw image: the offset only changes the DC bin and the factor is the same for every image, so training and
  inference agree;
* padding is *not* part of the image: SAM pads bottom/right to a square, and the step edge of the pad would
  add a spectrum that depends on the aspect ratio. Pass ``valid_hw`` (the un-padded size, top-left aligned, as
  SAM pads) and the FFT is taken over the valid region only, its normalised amplitude written into that region
  and the padding filled with 0. With ``valid_hw=None`` the whole tensor is used (the reference behaviour; the
  reference never pads because its input is already square).

Frequency Adapter
-----------------
:class:`FrequencyAdapter` maps the frequency tokens of one block to the next::

    z   = LN_f(F_{i-1})                         LayerNorm(dim, eps=1e-6)
    F_i = z + up(GELU(down(z)))                 down: Linear(dim -> hidden), up: Linear(hidden -> dim), with bias

and the encoder block adds ``scale * F_i`` (0.5 in I-MedSAM) to its residual stream in parallel with its MLP
(see :mod:`imedsam.peft.inject`). The FA is **not** an identity at initialisation: ``scale * LN_f(F)`` (plus a
random small MLP term) is added from step 0, as in the reference code (§F.17); with ``scale = 0`` it is a no-op.

``LN_f`` is frozen at its initial value (weight 1, bias 0) in reference mode, exactly as the official code
(where it is frozen by accident because its name lacks "adapter"); in paper mode it is trainable
(``norm_trainable=True``), which costs ``2 * dim`` parameters per block and lets the model rescale how much of
the normalised frequency signal reaches each block instead of being stuck with ``scale * LN(F)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imedsam.errors import ImedsamError

HW = tuple[int, int]


@torch.no_grad()
def frequency_image(
    images: torch.Tensor,
    *,
    reference: bool = False,
    log_amplitude: bool | None = None,
    valid_hw: HW | Sequence[HW] | None = None,
) -> torch.Tensor:
    """FFT-amplitude image of a batch, normalised per image to ``[0, 1]`` (see the module docstring).

    Args:
        images: ``(B, C, H, W)`` floating tensor, C >= 1 (normally the encoder input, C = 3).
        reference: ``True`` = the official code's grayscale (``255 * channel 0``) and unscaled FFT;
            ``False`` = paper mode (mean of the channels, ``"forward"`` FFT norm).
        log_amplitude: apply ``log1p`` to the amplitude before min-max; ``None`` = ``not reference``.
        valid_hw: the un-padded ``(h, w)`` (top-left) of every image, or one per image; the FFT covers only that
            region and the rest of the output is 0. ``None`` = the whole ``H x W``.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``, same device and (floating) dtype as ``images``; the DC bin of the
        (valid region's) spectrum is at ``(h // 2, w // 2)``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImedsamError(f"frequency_image expects images of shape (B, C, H, W), got {shape}")
    if log_amplitude is None:
        log_amplitude = not reference
    b, _, h, w = images.shape
    x = images.detach().float()
    gray = x[:, 0] * 255.0 if reference else x.mean(dim=1)  # (B, H, W)
    norm = "backward" if reference else "forward"

    regions = _valid_regions(valid_hw, b, h, w)
    out = torch.zeros((b, h, w), dtype=torch.float32, device=images.device)
    if all(r == (h, w) for r in regions):
        out = _normalised_amplitude(gray, norm, log_amplitude)
    else:
        for i, (vh, vw) in enumerate(regions):
            out[i, :vh, :vw] = _normalised_amplitude(gray[i : i + 1, :vh, :vw], norm, log_amplitude)[0]
    dtype = images.dtype if images.is_floating_point() else torch.float32
    return out.unsqueeze(1).expand(b, 3, h, w).to(dtype).contiguous()


def _normalised_amplitude(gray: torch.Tensor, norm: str, log_amplitude: bool) -> torch.Tensor:
    """``(B, h, w)`` grayscale -> per-image min-max normalised (log) shifted FFT amplitude ``(B, h, w)``."""
    amp = torch.fft.fftshift(torch.fft.fft2(gray, norm=norm), dim=(-2, -1)).abs()
    if log_amplitude:
        amp = torch.log1p(amp)
    flat = amp.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - lo
    return torch.where(span > 0, (amp - lo) / span.clamp_min(torch.finfo(amp.dtype).tiny), torch.zeros_like(amp))


def _valid_regions(valid_hw: HW | Sequence[HW] | None, b: int, h: int, w: int) -> list[HW]:
    if valid_hw is None:
        return [(h, w)] * b
    seq = list(valid_hw)  # type: ignore[arg-type]
    if len(seq) == 2 and not any(hasattr(v, "__len__") for v in seq):  # one (h, w) for every image
        seq = [tuple(seq)] * b  # type: ignore[list-item]
    if len(seq) != b:
        raise ImedsamError(f"valid_hw: expected one (h, w) or {b} of them (one per image), got {len(seq)}")
    regions: list[HW] = []
    for item in seq:
        vh, vw = (int(v) for v in item)  # type: ignore[union-attr]
        if not (1 <= vh <= h and 1 <= vw <= w):
            raise ImedsamError(f"valid_hw {(vh, vw)} must lie within the input size {(h, w)}")
        regions.append((vh, vw))
    return regions


STREAM_KEY = "frequency"  # where the stream's tokens live in EncoderContext.state


class FrequencyStream(nn.Module):
    """The frequency side stream of an encoder (``encoder.streams["frequency"]``; no parameters).

    ``begin`` computes ``F_0`` from the encoder input: :func:`frequency_image` (over ``ctx.valid_hw``) through the
    encoder's own frozen embedding (ViT: ``embed``, patch embedding + position embedding; TinyViT: the stem
    ``patch_embed``). TinyViT's ``follow`` passes ``F`` through each stage's frozen ``PatchMerging``, so it has
    the tokens' grid and width at every attention stage (module docstring of :mod:`imedsam.peft.inject`).
    """

    def __init__(self, *, reference: bool = False, log_amplitude: bool = True) -> None:
        super().__init__()
        self.reference = bool(reference)
        self.log_amplitude = bool(log_amplitude)

    def image(self, images: torch.Tensor, valid_hw) -> torch.Tensor:
        """The frequency image ``(B, 3, S, S)`` of the encoder input (:func:`frequency_image`); a subclass may
        compute the same function another way (the ONNX export's DFT matrices, :mod:`imedsam.export.dft`)."""
        return frequency_image(images, reference=self.reference, log_amplitude=self.log_amplitude,
                               valid_hw=valid_hw)

    def begin(self, encoder: nn.Module, images: torch.Tensor, ctx) -> None:
        freq = self.image(images, ctx.valid_hw)
        if hasattr(encoder, "embed"):  # ViT
            ctx.state[STREAM_KEY] = encoder.embed(freq)
            return
        f = encoder.patch_embed(freq)
        if encoder.layers[0].downsample is None:  # no merge after the stem: tokens at the stem grid
            f = f.flatten(2).transpose(1, 2)
        ctx.state[STREAM_KEY] = f

    def follow(self, merge: nn.Module, ctx) -> None:
        ctx.state[STREAM_KEY] = merge(ctx.state[STREAM_KEY])

    def extra_repr(self) -> str:
        return f"reference={self.reference}, log_amplitude={self.log_amplitude}"


class FrequencyAdapter(nn.Module):
    """One block's Frequency Adapter, attached in the block's ``mlp_parallel`` slot.

    :meth:`step` is the adapter proper, ``F_i = z + up(GELU(down(z)))`` with ``z = LN_f(F_{i-1})``; as a slot
    adapter (:meth:`forward`) it takes ``F_{i-1}`` from the frequency stream, stores ``F_i`` back for the next
    block and returns what joins the residual stream, ``scale * F_i`` (:meth:`merge`), beside the MLP.

    Args:
        dim: token width C.
        hidden: bottleneck width (4 in I-MedSAM).
        scale: factor with which the block adds ``F_i`` to its residual stream.
        skip: include ``z`` in the output (I-MedSAM's ``skip_connect=True``); ``False`` gives ``up(GELU(down(z)))``.
        norm_trainable: whether ``LN_f`` trains (paper mode) or stays frozen at weight 1 / bias 0 (reference).
        eps: LayerNorm epsilon.
        gate_init: ``None`` (I-MedSAM): the block adds ``scale * F_i``. A number adds a learnable scalar gate,
            ``scale * gate * F_i``, initialised to it; ``0.0`` makes the adapted encoder exactly the pretrained
            one at initialisation (useful when fine-tuning budgets are short).

    Shapes: ``(B, ..., C) -> (B, ..., C)`` (the stream has the block's token layout).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 4,
        scale: float = 0.5,
        skip: bool = True,
        norm_trainable: bool = True,
        eps: float = 1e-6,
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1:
            raise ImedsamError(f"FrequencyAdapter needs dim >= 1 and hidden >= 1, got dim={dim}, hidden={hidden}")
        self.dim = int(dim)
        self.hidden = int(hidden)
        self.scale = float(scale)
        self.skip = bool(skip)
        self.norm = nn.LayerNorm(self.dim, eps=eps)
        self.norm.requires_grad_(bool(norm_trainable))
        self.down = nn.Linear(self.dim, self.hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(self.hidden, self.dim)
        self.gate = None if gate_init is None else nn.Parameter(torch.tensor(float(gate_init)))

    def merge(self, f: torch.Tensor) -> torch.Tensor:
        """What the block adds to its residual stream: ``scale * F_i`` (times the gate, when there is one)."""
        return self.scale * f if self.gate is None else (self.scale * self.gate.to(f.dtype)) * f

    def step(self, f: torch.Tensor) -> torch.Tensor:
        """``F_{i-1} -> F_i``."""
        z = self.norm(f)
        y = self.up(self.act(self.down(z)))
        return z + y if self.skip else y

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        """Slot protocol: advance the stream in ``ctx.state`` and return ``merge(F_i)`` (``h`` is unused)."""
        if ctx is None or STREAM_KEY not in ctx.state:
            raise ImedsamError("FrequencyAdapter: the encoder has no frequency stream; attach adapters with "
                               "imedsam.peft.inject_adapters")
        f = self.step(ctx.state[STREAM_KEY])
        ctx.state[STREAM_KEY] = f
        return self.merge(f)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, scale={self.scale:g}, skip={self.skip}"
