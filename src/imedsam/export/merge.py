"""The image encoder as it is exported: a copy with linear adapters folded into their base weights and the parts
the exporter cannot trace written another way. The system itself is left untouched.

* LoRA (:class:`~imedsam.peft.lora.LoRAQKV`, ungated): ``W' = W + scale * B A`` on its columns
  (:meth:`~imedsam.peft.lora.LoRAQKV.delta_weight`) becomes one plain ``nn.Linear``: the exported encoder costs
  what the base encoder costs. A gated LoRA (``mode: reference``) depends on its input and is exported as it runs.
* I-MedSAM's frequency stream: ``torch.fft`` is replaced by DFT matrix products (:mod:`imedsam.export.dft`), and
  the encoder graph takes the un-padded size ``valid_hw`` as a second input.
* Other adapters (SAM-Med2D's, the frequency adapters themselves) are non-linear in their input and are
  exported as they are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from imedsam.export.dft import DftFrequencyStream
from imedsam.peft.frequency import FrequencyStream
from imedsam.peft.lora import LoRAQKV


@dataclass
class ExportEncoder:
    """An encoder ready to trace and what was changed to get it.

    Attributes:
        module: the copied encoder (eval mode, frozen).
        merged: human-readable notes of the adapters folded into base weights.
        rewritten: notes of the parts computed another way (same function).
        needs_valid_hw: the graph takes ``valid_hw`` (frequency stream present).
    """

    module: nn.Module
    merged: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    needs_valid_hw: bool = False


def merge_lora(layer: LoRAQKV) -> nn.Linear:
    """An ungated :class:`LoRAQKV` as one ``nn.Linear`` with ``W + delta_weight()`` (same dtype and device)."""
    base = layer.base
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(base.weight.float() + layer.delta_weight().float())
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def export_encoder(encoder: nn.Module) -> ExportEncoder:
    """A frozen eval-mode copy of ``encoder`` with LoRA merged and the frequency stream's FFT rewritten."""
    module = copy.deepcopy(encoder).eval().requires_grad_(False)
    out = ExportEncoder(module)
    folded = gated = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoRAQKV):
            if child.gated:
                gated += 1
                continue
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, merge_lora(child))
            folded += 1
    if folded:
        out.merged.append(f"LoRA: W + (alpha/rank) B A folded into {folded} qkv projections")
    if gated:
        out.rewritten.append(f"gated LoRA (reference mode) kept as it runs in {gated} qkv projections: its gate "
                             "depends on the input, no fixed weight exists")
    streams = getattr(module, "streams", {})
    for key, stream in list(streams.items()):
        if isinstance(stream, FrequencyStream) and not isinstance(stream, DftFrequencyStream):
            streams[key] = DftFrequencyStream.replacing(stream)
            out.rewritten.append("frequency image: torch.fft.fft2 + fftshift (no ONNX symbolic in the TorchScript "
                                 "exporter) as DFT matrix products over the un-padded region (input valid_hw)")
            out.needs_valid_hw = True
    return out
