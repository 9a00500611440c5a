import pytest

from imedsam.errors import ImedsamError
from imedsam.train.config import load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 3\nmodel:\n  backbone: tiny_tinyvit_test\n")
    cfg = load_config(path, ["optim.batch_size=4", "model.decoder.topk_ratio=0.25", "model.peft.frequency=false"])
    assert cfg.optim.epochs == 3 and cfg.optim.batch_size == 4
    assert cfg.model.backbone == "tiny_tinyvit_test"
    assert cfg.model.decoder.topk_ratio == 0.25 and cfg.model.peft.frequency is False


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ImedsamError, match="optim.epoch"):
        load_config(None, ["optim.epoch=3"])
    with pytest.raises(ImedsamError, match="expected KEY=VALUE"):
        load_config(None, ["optim.epochs"])
    with pytest.raises(ImedsamError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
