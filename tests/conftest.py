"""Session-wide test settings: a private imedsam cache (the CPU precision calibration is written there, never
into the user's ~/.cache)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_imedsam_cache(tmp_path_factory):
    previous = os.environ.get("IMEDSAM_CACHE")
    os.environ["IMEDSAM_CACHE"] = str(tmp_path_factory.mktemp("imedsam_cache"))
    yield
    if previous is None:
        os.environ.pop("IMEDSAM_CACHE", None)
    else:
        os.environ["IMEDSAM_CACHE"] = previous
