"""``optim.max_minutes``: a run stops after the step during which its wall-clock budget runs out, validates and
checkpoints that partial epoch (best-on-val selection kept), counts the budget over resumes, and without a budget
trains exactly as before. The clock is a fake one (each reading 10 s later), so the stop step is exact."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from imedsam.peft.files import load_adapters
from imedsam.train import checkpoint as ckpt
from imedsam.train import loop
from imedsam.train.api import run_training
from imedsam.train.config import load_config


@pytest.fixture
def stacks_root(tmp_path: Path) -> Path:
    """3 tiny labelled volumes (6 slices each) in the nnU-Net layout: 2 train + 1 held out = 12 stacks, 6 steps
    per epoch at batch 2."""
    from tests.data.conftest import write_stacks_dataset

    return write_stacks_dataset(tmp_path / "Dataset005_B", "b")


def _config(*extra: str):
    return load_config(None, ["model.system=ma_sam", "model.backbone=tiny_tinyvit_test", "model.stack_depth=3",
                              "model.decoder.num_classes=2", "data.image_size=64", "optim.epochs=2",
                              "optim.batch_size=2", "data.val_fraction=0.34", "run.device=cpu",
                              "run.precision=fp32", "data.augment=false", *extra])


class _Clock:
    """Each reading is 10 s after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 10.0
        return self.now


def test_budget_stops_after_the_step_that_spends_it_then_validates_and_checkpoints(stacks_root, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=_Clock().perf_counter))
    run = tmp_path / "run"
    cfg = _config("optim.max_minutes=0.5")
    result = run_training(cfg, stacks_root, run)
    assert result.epochs_done == 1 and len(result.history) == 1
    record = result.history[0]
    # the clock reads 10 s at the start and +10 s per step: after step 3 it has run 30 s >= 0.5 min
    assert record["step"] == 3 and record["stopped"] == "optim.max_minutes=0.5 spent"
    assert 0.0 <= record["val"]["dice"] <= 1.0 and result.best_score == record["val"]["dice"]  # validated
    assert (run / ckpt.BEST_ADAPTER_FILE).is_file() and (run / ckpt.ADAPTER_FILE).is_file()
    folder = ckpt.latest_checkpoint(run)
    state = torch.load(folder / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["train_seconds"] >= 30.0
    # the budget counts over resumes: a resumed run that has spent it does nothing more
    again = run_training(cfg, stacks_root, run, resume=True)
    assert again.history[-1]["step"] == 3 and len(again.history) == 1


def test_without_a_budget_nothing_changes(stacks_root, tmp_path):
    result = run_training(_config("optim.max_steps=4"), stacks_root, tmp_path / "plain")
    assert [h["step"] for h in result.history] == [4]  # max_steps alone, as before
    assert all("stopped" not in h for h in result.history)
    roomy = run_training(_config("optim.max_steps=4", "optim.max_minutes=60"), stacks_root, tmp_path / "roomy")
    assert [h["step"] for h in roomy.history] == [4] and all("stopped" not in h for h in roomy.history)
    a, _ = load_adapters(tmp_path / "plain" / ckpt.ADAPTER_FILE)
    b, _ = load_adapters(tmp_path / "roomy" / ckpt.ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit


def test_budget_must_be_positive():
    from imedsam.errors import ImedsamError

    with pytest.raises(ImedsamError, match="optim.max_minutes"):
        _config("optim.max_minutes=0")
