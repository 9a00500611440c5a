"""Fixtures of the server tests: a tiny random-init model (fast) served through FastAPI's TestClient."""

from __future__ import annotations

import io as _io

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="serve tests need the web extra: pip install 'imedsam[web]'")


@pytest.fixture(scope="session")
def tiny_segmenter():
    from imedsam.infer.segmenter import Segmenter

    torch.manual_seed(0)
    return Segmenter("tiny_vit_test", device="cpu", precision="fp32")


@pytest.fixture()
def make_client(tiny_segmenter):
    from fastapi.testclient import TestClient

    from imedsam.serve import ServeSettings, create_app

    clients = []

    def make(**settings):
        app = create_app(ServeSettings(model="tiny_vit_test", **settings),
                         segmenters={"tiny_vit_test": tiny_segmenter})
        client = TestClient(app)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def png_bytes(array: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        import base64

        data = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(_io.BytesIO(data)))


@pytest.fixture()
def disc_png() -> bytes:
    yy, xx = np.mgrid[:64, :80]
    image = np.full((64, 80), 30, np.uint8)
    image[(yy - 30) ** 2 + (xx - 40) ** 2 < 15 ** 2] = 220
    return png_bytes(image)


@pytest.fixture()
def small_nifti(tmp_path):
    """A (D, H, W) = (6, 40, 48) volume (nibabel shape (48, 40, 6)) with a bright box, 0.8 x 0.9 x 2.5 mm."""
    data = np.full((48, 40, 6), 10.0, np.float32)
    data[15:30, 10:25, 1:5] = 200.0
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 30.0)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path
