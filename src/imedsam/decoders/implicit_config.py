"""The options of the implicit decoder (:class:`ImplicitDecoderConfig`, the ``model.decoder`` section of an
I-MedSAM config) and what it returns (:class:`ImplicitOutput`). The decoder itself: :mod:`imedsam.decoders.implicit`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Mode = Literal["paper", "reference"]


class ImplicitDecoderConfig(BaseModel):
    """Options of :class:`ImplicitDecoder` (the ``model.decoder`` section of an I-MedSAM config).

    The widths that come from the backbone (``feature_dim``, ``prompt_dim``) and the system's ``mode`` are
    arguments of :class:`ImplicitDecoder`, not options. ``encoding`` and ``mc_samples`` default from the mode:
    paper -> ("paper", 8), reference -> ("reference", 2). ``chunk_size`` is the number of query points per image
    processed at once at inference (``None``: :func:`decode_chunk`). ``coarse_feature_dim`` is the width of the
    coarse feature passed to the fine MLP. ``fine_hidden`` lists the fine trunk widths followed by the width of the per-class fine head's hidden
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
    chunk_size: int | None = Field(None, ge=1, description="points decoded per chunk at inference (bounds "
                                                           "memory); null: the most whose widest trunk output "
                                                           "fits the CPU's last-level cache, 2048-16384 "
                                                           "(decode_chunk)")
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


#: chunk of query points on GPUs, and the bounds of the CPU choice
MAX_CHUNK, MIN_CHUNK = 16384, 2048


def decode_chunk(config: ImplicitDecoderConfig, dtype: torch.dtype, device: torch.device,
                 cache_bytes: int | None = None) -> int:
    """Query points decoded at once: ``config.chunk_size`` if set; else on CPU the largest power of two whose
    widest trunk output (``max(coarse_hidden)`` values in ``dtype``) fits in the last-level cache ``cache_bytes``
    (default: :func:`imedsam.runtime.last_level_cache_bytes`), within [2048, 16384]; 16384 on other devices or
    when the cache size is unknown. A chunk never changes the result, only speed and memory: on a 2-core AMD EPYC
    with a 32 MB L3, fp32 decoding at 384^2 took 1.10 s in chunks of 8192 against 1.39 s in chunks of 16384
    interleaved in one process (the 64 MB activation of the 1024-wide layer spills from the cache), and in
    ``benchmarks/imedsam.py --against`` (separate processes, noisier) 1.20-1.29 s against 1.22-1.36 s, with
    peak memory 0.79 against 0.84 GB."""
    if config.chunk_size is not None:
        return int(config.chunk_size)
    if torch.device(device).type != "cpu":
        return MAX_CHUNK
    if cache_bytes is None:
        from imedsam.runtime import last_level_cache_bytes

        cache_bytes = last_level_cache_bytes()
    if not cache_bytes:
        return MAX_CHUNK
    per_point = max(config.coarse_hidden) * torch.empty((), dtype=dtype).element_size()
    fits = max(1, cache_bytes // per_point)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, 1 << (fits.bit_length() - 1))))
