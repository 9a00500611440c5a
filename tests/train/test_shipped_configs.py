"""Every config shipped in configs/ loads into the typed config tree, names a registered system, and its
header comment gives the command that uses it."""

from pathlib import Path

import pytest

from imedsam.models.registry import get_system
from imedsam.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path, [])
    assert get_system(cfg.model.system).name == cfg.model.system
    assert f"--config configs/{path.name}" in path.read_text(), "the header should say how to run it"
