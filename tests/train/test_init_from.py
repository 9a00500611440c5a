"""``run.init_from`` / ``imedsam train --init-from``: a run starts from another run's trained tensors (MA-SAM's
box-prompted variant fine-tuned from the automatic run), checked before any data is read."""

from __future__ import annotations

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.models.registry import build_system, validate_model_config
from imedsam.train.init_weights import InitSource, load_init_weights, read_init_source

TINY_MASAM = {"system": "ma_sam", "backbone": "tiny_tinyvit_test", "stack_depth": 3, "img_size": 64,
              "decoder": {"num_classes": 2}}


def _masam(seed: int, **decoder):
    torch.manual_seed(seed)
    config = dict(TINY_MASAM, decoder={**TINY_MASAM["decoder"], **decoder})
    return build_system(config=validate_model_config(config))


def _trainable(system) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in system.named_parameters() if p.requires_grad}


def _perturbed_source(tmp_path, seed: int = 1):
    """A tiny automatic MA-SAM whose trainable tensors are all random (FacT's V and the adapters' up start at
    zero), saved as a run's ``best.safetensors``."""
    source = _masam(seed)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_()
    run = tmp_path / "auto_run"
    run.mkdir()
    source.save_trainable(run / "best.safetensors")
    return run, _trainable(source)


def test_box_variant_starts_from_the_automatic_run(tmp_path):
    run, want = _perturbed_source(tmp_path)
    target = _masam(7, prompt="box")  # the box-prompted variant: the same tensors
    before = _trainable(target)
    counts = load_init_weights(target, read_init_source(run, "ma_sam"))
    got = _trainable(target)
    assert counts == {"loaded": len(want), "kept": 0, "unused": 0}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert any(not torch.equal(before[n], want[n]) for n in want)  # it changed something


def test_tensors_the_source_lacks_keep_their_initialisation(tmp_path):
    run, want = _perturbed_source(tmp_path)
    source = read_init_source(run, "ma_sam")
    dropped = sorted(source.state)[0]
    partial = InitSource(source.file, source.system, {k: v for k, v in source.state.items() if k != dropped})
    target = _masam(7)
    before = _trainable(target)
    counts = load_init_weights(target, partial)
    assert counts == {"loaded": len(want) - 1, "kept": 1, "unused": 0}
    got = _trainable(target)
    assert torch.equal(got[dropped], before[dropped])
    assert all(torch.equal(got[n], want[n]) for n in want if n != dropped)


def test_refusals_name_the_option(tmp_path):
    run, _ = _perturbed_source(tmp_path)
    with pytest.raises(ImedsamError, match=r"run.init_from: .* holds a 'ma_sam' model; this config trains 'imedsam'"):
        read_init_source(run, "imedsam")
    with pytest.raises(ImedsamError, match=r"run.init_from: file not found"):
        read_init_source(tmp_path / "missing", "ma_sam")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImedsamError, match=r"run.init_from: no best.safetensors or adapter.safetensors"):
        read_init_source(tmp_path / "empty", "ma_sam")
    three_classes = _masam(7, num_classes=3)  # another decoder: a tensor of the same name, another shape
    with pytest.raises(ImedsamError, match=r"run.init_from: .*has shape"):
        load_init_weights(three_classes, read_init_source(run, "ma_sam"))
    source = read_init_source(run, "ma_sam")
    alien = InitSource(source.file, source.system, {"nothing.of.this.model": torch.zeros(2)})
    with pytest.raises(ImedsamError, match="shares no trainable tensor"):
        load_init_weights(_masam(7), alien)


def test_cli_refuses_a_bad_init_source_before_reading_data(tmp_path, capsys):
    from imedsam.cli import main

    run, _ = _perturbed_source(tmp_path)
    # the data folder does not exist: the init check must come first (and the output folder stays empty)
    code = main(["train", "--data", str(tmp_path / "no_data"), "--out", str(tmp_path / "out"), "--init-from",
                 str(run), "model.system=imedsam", "model.backbone=tiny_tinyvit_test"])
    assert code == 2
    err = capsys.readouterr().err
    assert "run.init_from" in err and "holds a 'ma_sam' model" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / "out").glob("*"))


def test_training_from_a_run_continues_from_its_weights(tmp_path):
    """A run with run.init_from and a learning rate too small to move anything ends where its source was; the
    same run without it ends at its own seeded initialisation."""
    from tests.data.conftest import write_stacks_dataset

    from imedsam.peft.files import load_adapters
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    data = write_stacks_dataset(tmp_path / "Dataset009_I", "i")
    src_run, want = _perturbed_source(tmp_path)
    base = ["model.system=ma_sam", "model.backbone=tiny_tinyvit_test", "model.stack_depth=3",
            "model.decoder.num_classes=2", "model.decoder.prompt=box", "data.image_size=64", "optim.epochs=1",
            "optim.max_steps=1", "optim.batch_size=2", "data.val_fraction=0.34", "run.device=cpu",
            "run.precision=fp32", "data.augment=false", "optim.lr_decoder=1e-12", "optim.lr_adapter=1e-12",
            "optim.weight_decay=0", "optim.warmup_steps=0"]
    run_training(load_config(None, [*base, f"run.init_from={src_run}"]), data, tmp_path / "fine")
    run_training(load_config(None, base), data, tmp_path / "scratch")
    fine, config = load_adapters(tmp_path / "fine" / "adapter.safetensors")
    scratch, _ = load_adapters(tmp_path / "scratch" / "adapter.safetensors")
    assert fine.keys() == want.keys()
    assert all(torch.allclose(fine[n], want[n], atol=1e-6) for n in want)
    assert not all(torch.allclose(scratch[n], want[n], atol=1e-6) for n in want)
