"""One registry of assembled systems.

* SAM-family backbones used zero-shot (``litemedsam``, ``mobilesam``, ``sam_vit_b/l/h`` and the tiny test
  configs): :class:`~imedsam.models.sam.ZeroShotSam`.
* ``imedsam``: I-MedSAM (LoRA + frequency adapter + implicit decoder) on any of those backbones.
"""

from __future__ import annotations

from pathlib import Path

from imedsam.errors import ImedsamError
from imedsam.models.base import SegmentationSystem

ADAPTED_SYSTEMS = {"imedsam": "I-MedSAM: LoRA(q,v) + frequency adapter + implicit coarse-to-fine decoder"}


def describe_models() -> dict[str, str]:
    """Name -> one-line description, for `imedsam info` and error messages."""
    from imedsam.sam.build import describe_models as describe_backbones

    return {**describe_backbones(), **ADAPTED_SYSTEMS}


def build_system(name: str, *, checkpoint: str | Path | None = None, adapter: str | Path | None = None,
                 backbone: str | None = None, **options) -> SegmentationSystem:
    """Build a system by name; ``adapter`` loads trained adapter weights (and their config) for adapted systems."""
    from imedsam.sam.build import MODEL_SPECS, build_sam

    if name in ADAPTED_SYSTEMS:
        from imedsam.models.imedsam import build_imedsam

        return build_imedsam(checkpoint=checkpoint, adapter=adapter, backbone=backbone, **options)
    if name not in MODEL_SPECS:
        known = ", ".join(list(MODEL_SPECS) + list(ADAPTED_SYSTEMS))
        raise ImedsamError(f"--model: unknown model {name!r}; known models: {known}")
    if adapter is not None:
        raise ImedsamError(f"--adapter: model {name!r} is used zero-shot; adapters need --model imedsam")
    if options:
        raise ImedsamError(f"model {name!r} takes no options {sorted(options)}")
    from imedsam.models.sam import ZeroShotSam

    return ZeroShotSam(build_sam(name, checkpoint=checkpoint))


def parameter_breakdown(name: str, *, backbone: str | None = None, mode: str | None = None) -> dict:
    """Trainable parameters per group of a system (random init, no weights needed)."""
    if name in ADAPTED_SYSTEMS:
        from imedsam.models.imedsam import imedsam_parameter_breakdown

        return imedsam_parameter_breakdown(backbone=backbone or "litemedsam", mode=mode or "paper",
                                           img_size=384 if (backbone or "").startswith("sam_vit") else None)
    from imedsam.sam.build import build_sam

    system = build_sam(name, pretrained=False)
    total = sum(p.numel() for p in system.parameters())
    return {"model": name, "backbone": name, "mode": "zero-shot",
            "trainable": {"(none: zero-shot)": 0}, "total_trainable": 0, "total": total}
