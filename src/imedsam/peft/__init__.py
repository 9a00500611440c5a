"""Parameter-efficient adapters, injected into a SAM-family encoder from outside (see :mod:`imedsam.peft.inject`).

* :class:`LoRAQKV` — LoRA on q/v of a fused qkv projection (contiguous or per-head interleaved layout).
* :func:`frequency_image`, :class:`FrequencyAdapter` — I-MedSAM's frequency branch.
* :func:`inject_adapters` with :class:`PeftConfig` — the one surgery; plus parameter counting and adapter files.
"""

from imedsam.peft.frequency import FrequencyAdapter, frequency_image
from imedsam.peft.inject import (
    FrequencyAdaptedTinyViT,
    FrequencyAdaptedViT,
    PeftConfig,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    save_adapters,
    trainable_parameters,
)
from imedsam.peft.lora import LoRAQKV

__all__ = [
    "FrequencyAdaptedTinyViT",
    "FrequencyAdaptedViT",
    "FrequencyAdapter",
    "LoRAQKV",
    "PeftConfig",
    "adapter_state_dict",
    "frequency_image",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "save_adapters",
    "trainable_parameters",
]
