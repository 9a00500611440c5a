"""A small embedded dataset the demo can build without network: synthetic lesions on real CT texture.

The background of every image is a random crop (random position, scale, flip and rotation by multiples of 90
degrees) of the real CT slice that pydicom ships (``CT_small.dcm``, soft-tissue window). Into each crop one
ellipse-shaped "lesion" is painted with a random size, orientation, contrast (darker than bright tissue,
brighter than dark tissue), soft edge and texture noise; its ellipse is the ground-truth mask. **The lesions and their labels are
synthetic, not real patient findings**; the data set only exercises the fine-tune -> evaluate loop end to end.

Layout written: ``images/*.png`` (gray uint8), ``masks/*.png`` (0/255) and ``splits.json`` (train/val/test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imedsam.io.atomic import atomic_write


def _background(ct: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    h, w = ct.shape
    crop = int(rng.integers(int(0.55 * min(h, w)), min(h, w) + 1))
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    patch = ct[y0:y0 + crop, x0:x0 + crop]
    patch = np.rot90(patch, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def make_lesion_image(ct: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (size, size), mask bool (size, size)) pair; see the module docstring."""
    image = _background(ct, size, rng)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    ry, rx = rng.uniform(0.08, 0.2, size=2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    r = np.sqrt(u * u + v * v)
    mask = r <= 1.0
    edge = np.clip((1.15 - r) / 0.3, 0, 1)  # soft boundary around the ellipse
    local = float(image[mask].mean())  # darker lesion on bright tissue, brighter on dark: always visible
    contrast = (-1.0 if local > 128 else 1.0) * rng.uniform(50, 90)
    texture = rng.normal(0, 8, size=(size, size)).astype(np.float32)
    image = image + edge * (contrast + texture) + rng.normal(0, 4, size=(size, size))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_lesions(root: str | Path, *, n: int = 24, size: int = 128, seed: int = 0,
                           fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """Write ``n`` synthetic lesion images + masks + ``splits.json`` under ``root``; returns ``root``."""
    from PIL import Image

    from imedsam.io import read, to_display_rgb
    from imedsam.io.samples import embedded_ct_slice

    root = Path(root)
    ct = to_display_rgb(read(embedded_ct_slice()), window="soft_tissue")[..., 0].astype(np.float32)
    rng = np.random.default_rng(seed)
    stems = []
    for i in range(n):
        image, mask = make_lesion_image(ct, size, rng)
        stem = f"lesion_{i:03d}"
        atomic_write(root / "images" / f"{stem}.png", lambda tmp, a=image: Image.fromarray(a).save(tmp))
        atomic_write(root / "masks" / f"{stem}.png",
                     lambda tmp, m=mask: Image.fromarray((m * 255).astype(np.uint8)).save(tmp))
        stems.append(stem)
    n_train, n_val = round(n * fractions[0]), round(n * fractions[1])
    splits = {"train": stems[:n_train], "val": stems[n_train:n_train + n_val], "test": stems[n_train + n_val:]}
    atomic_write(root / "splits.json", lambda tmp: tmp.write_text(json.dumps(splits, indent=1)))
    return root
