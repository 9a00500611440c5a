"""`imedsam demo` / `make demo`: the main job on the embedded default.

Step 1 (zero-shot): the CT slice that pydicom ships (``CT_small.dcm``, 128x128, a thoracic vertebra; real CT,
public test data of pydicom) is segmented with LiteMedSAM from a box around the vertebral body; the mask and an
overlay PNG are written to the output folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)

#: box around the vertebral body of CT_small.dcm, (x0, y0, x1, y1) in pixels of the 128x128 slice
CT_SMALL_VERTEBRA_BOX = (40.0, 3.0, 81.0, 47.0)


def run_zero_shot_ct(out: Path, device: str = "auto") -> dict:
    """Segment the embedded CT slice with LiteMedSAM; returns the written paths and mask statistics."""
    from imedsam import io
    from imedsam.infer.segmenter import Segmenter
    from imedsam.io.samples import embedded_ct_slice

    sample = io.read(embedded_ct_slice())
    rgb = io.to_display_rgb(sample, window="soft_tissue")
    seg = Segmenter("litemedsam", device=device)
    seg.set_image(rgb)
    pred = seg.predict(box=CT_SMALL_VERTEBRA_BOX)
    mask = pred.masks[0]
    mask_path, overlay_path = out / "ct_small_mask.png", out / "ct_small_overlay.png"
    io.write_mask(mask_path, mask)
    io.write_overlay(overlay_path, rgb, mask)
    spacing = sample.geometry.spacing
    area_mm2 = float(mask.sum() * spacing[0] * spacing[1]) if spacing else None
    return {"image": str(embedded_ct_slice()), "box": list(CT_SMALL_VERTEBRA_BOX),
            "mask": str(mask_path.resolve()), "overlay": str(overlay_path.resolve()),
            "foreground_pixels": int(mask.sum()), "area_mm2": area_mm2, "score": float(pred.scores[0])}


def run_demo(out: Path, data: Path | None = None, device: str = "auto") -> dict:
    """Run the demo; prints one JSON line per step and returns them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is not None and not Path(data).exists():
        raise ImedsamError(f"--data: folder not found: {data}")
    results = {"zero_shot_ct": run_zero_shot_ct(out, device)}
    print(json.dumps({"step": "zero_shot_ct", **results["zero_shot_ct"]}))
    return results
