"""A tiny real-format dataset for training tests: gray 64x64 images with a bright disc (the mask)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_discs(root: Path, n: int, n_train: int, n_val: int, seed: int) -> Path:
    """``n`` images/masks in ``root/images`` and ``root/masks`` (random centres and radii from ``seed``) and a
    splits.json: the first ``n_train`` train, the next ``n_val`` val, the rest test."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    stems = []
    for i in range(n):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 16)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = (40 + 150 * mask + rng.normal(0, 10, mask.shape)).clip(0, 255).astype(np.uint8)
        stem = f"case{i:02d}"
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
        stems.append(stem)
    splits = {"train": stems[:n_train], "val": stems[n_train:n_train + n_val], "test": stems[n_train + n_val:]}
    (root / "splits.json").write_text(json.dumps(splits))
    return root
