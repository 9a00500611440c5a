"""``--precision auto`` per model part (image encoder, prompt decoder) on CPUs that one GEMM does not settle.

:func:`imedsam.runtime.cpu_precision` decides a whole machine from a GEMM and a convolution. Where bf16 is far
ahead (AMX) or not native, that holds for every part; in between (``avx512_bf16`` without AMX, e.g. oneDNN's
``avx512_core_bf16`` kernels) the parts of one model disagree: LiteMedSAM's encoder ran faster in bf16 there,
its decoders and ViT-B in fp32 (README). :func:`auto_part_dtypes` then times each part of the model on its own
work, in fp32 and in bf16 (a bf16 copy of the model, so the fp32 weights stay exact), once per CPU, model and
input size (:func:`imedsam.runtime.part_precision` caches the decision), and returns the autocast dtype of each.

The work timed: the encoder on a seeded random image of its input size; the decoder on that image's embedding
with one box (prompt-free systems: no prompt), decoded on the input grid. One warm-up call, then the best of two.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from imedsam.models.base import Prompts
from imedsam.models.views import EncodedView, FlipView
from imedsam.runtime import autocast, cast_frozen_weights, part_precision
from imedsam.sam.prepare import prepare_image

log = logging.getLogger(__name__)

__all__ = ["auto_part_dtypes", "part_names"]


def part_names(system) -> tuple[str, str]:
    """The cache names of ``system``'s encoder and decoder, e.g. ``"imedsam litemedsam encoder 256"``."""
    backbone = getattr(getattr(system, "config", None), "backbone", None) or "?"
    size = system.preprocess.img_size
    return tuple(f"{system.name} {backbone} {part} {size}" for part in ("encoder", "decoder"))  # type: ignore


def _best_seconds(fn: Callable[[], object], repeats: int = 2) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def auto_part_dtypes(system, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(encoder dtype, decoder dtype)`` for ``--precision auto`` on CPU (None = fp32), measured on ``system``
    (fp32 weights, not yet prepared for inference) where :func:`imedsam.runtime.part_precision` needs it."""
    size = system.preprocess.img_size
    image = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    prepared = prepare_image(image, system.preprocess, device)
    models: dict[torch.dtype, torch.nn.Module] = {torch.float32: system}
    embeddings: dict[torch.dtype, torch.Tensor] = {}

    def model(dtype: torch.dtype):
        if dtype not in models:  # built only when a part is really measured; normal tensors, not inference ones
            with torch.inference_mode(False):
                twin = copy.deepcopy(system).eval().requires_grad_(False)
                cast_frozen_weights(twin, dtype)
            models[dtype] = twin
        return models[dtype]

    def encode(dtype: torch.dtype) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, None if dtype == torch.float32 else dtype):
            embeddings[dtype] = model(dtype).encode(prepared.tensor, valid_hw=prepared.input_size)
        return embeddings[dtype]

    def decode(dtype: torch.dtype) -> None:
        emb = embeddings[dtype] if dtype in embeddings else encode(dtype)
        box = np.array([size / 4, size / 4, 3 * size / 4, 3 * size / 4])
        prompts = EncodedView(FlipView(), prepared, emb).prompts(box=box) if "box" in system.prompt_types \
            else Prompts()
        with torch.inference_mode(), autocast(device, None if dtype == torch.float32 else dtype):
            model(dtype).decode(emb if dtype != torch.float32 else emb.float(), prepared, prompts, seed=0)

    encoder_name, decoder_name = part_names(system)
    was_training = system.training
    system.eval()
    try:
        enc = part_precision(encoder_name, lambda dt: _best_seconds(lambda: encode(dt)))
        dec = part_precision(decoder_name, lambda dt: _best_seconds(lambda: decode(dt)))
    finally:
        system.train(was_training)
    for part in (enc, dec):
        if part.source == "measured":
            log.info("precision auto: %s measured fp32 %.3f s, bf16 %.3f s -> %s", part.key, part.fp32_seconds,
                     part.bf16_seconds, part.choice)
    return tuple(torch.bfloat16 if p.choice == "bf16" else None for p in (enc, dec))  # type: ignore[return-value]
