"""Zero-shot LiteMedSAM on the Kvasir-Sessile test split with tight ground-truth boxes: mean Dice >= 0.90.

Protocol: split = ``test`` of ../shared/data/kvasir-sessile/splits.json (39 images, 256x256), prompt = tight box of
the ground-truth mask (half-open: one past the last foreground column/row), prediction at the original 256x256
grid, fp32, Dice per image averaged over images.
"""

import json

import numpy as np
import pytest

from imedsam.errors import ImedsamError
from imedsam.io import read_image
from tests.datapaths import shared_dataset


def test_litemedsam_zero_shot_dice_on_kvasir_sessile_test():
    from imedsam.data.prompts import box_from_mask
    from imedsam.evaluate.metrics import binary_metrics
    from imedsam.infer.segmenter import Segmenter

    root = shared_dataset("kvasir-sessile")
    try:
        seg = Segmenter("litemedsam", device="cpu", precision="fp32")
    except ImedsamError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")
    stems = json.loads((root / "splits.json").read_text())["test"]
    assert len(stems) == 39
    dices = []
    for stem in stems:
        image = read_image(next((root / "images").glob(f"{stem}.*"))).array
        gt = read_image(root / "masks" / f"{stem}.png").array > 127
        seg.set_image(image)
        pred = seg.predict(box=box_from_mask(gt))
        dices.append(binary_metrics(pred.masks[0], gt)["dice"])
    mean = float(np.mean(dices))
    print(f"zero-shot LiteMedSAM kvasir-sessile test: mean Dice {mean:.4f} over {len(dices)} images")
    assert mean >= 0.90
