"""Parameter-efficient adapters, attached to a SAM-family encoder from outside at its named insertion points
(:mod:`imedsam.sam.insertion`).

* :class:`LoRAQKV`, :func:`attach_lora` — LoRA on q/v of a fused qkv projection (the ``qkv`` point).
* :func:`frequency_image`, :class:`FrequencyAdapter`, :class:`FrequencyStream` — I-MedSAM's frequency branch.
* :class:`Med2DAdapter`, :func:`attach_med2d` — SAM-Med2D's channel + spatial adapter (``mlp_parallel``).
* :func:`inject_adapters` with :class:`PeftConfig` — I-MedSAM's surgery (freeze, LoRA, frequency stream).
* :mod:`imedsam.peft.files` — adapter files and parameter counts.
"""

from imedsam.peft.backbone import attention_blocks, freeze_backbone
from imedsam.peft.files import (
    adapter_state_dict,
    load_adapter_state_dict,
    load_adapters,
    save_adapters,
    trainable_parameters,
)
from imedsam.peft.frequency import FrequencyAdapter, FrequencyStream, frequency_image
from imedsam.peft.inject import PeftConfig, inject_adapters
from imedsam.peft.lora import LoRAQKV, attach_lora
from imedsam.peft.med2d import Med2DAdapter, attach_med2d

__all__ = [
    "FrequencyAdapter",
    "FrequencyStream",
    "LoRAQKV",
    "Med2DAdapter",
    "PeftConfig",
    "adapter_state_dict",
    "attach_lora",
    "attach_med2d",
    "attention_blocks",
    "freeze_backbone",
    "frequency_image",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "save_adapters",
    "trainable_parameters",
]
