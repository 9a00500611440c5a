"""Training on a tiny synthetic dataset with a tiny random backbone: loss decreases, resume is exact, CLI works."""

import csv
import json

import pytest
import torch

from imedsam.train.api import run_training
from imedsam.train.config import load_config
from tests.train.discs import write_discs


@pytest.fixture(scope="module")
def disc_dataset(tmp_path_factory):
    """16 gray 64x64 images with a bright disc (the mask), random centres and radii; splits.json 10/3/3."""
    return write_discs(tmp_path_factory.mktemp("discs"), 16, 10, 3, seed=0)


def _config(**extra):
    overrides = ["model.backbone=tiny_tinyvit_test", "data.image_size=64", "optim.batch_size=2",
                 "objective.points_per_image=256", "model.decoder.coarse_hidden=[64,32]",
                 "model.decoder.coarse_feature_dim=16", "model.decoder.fine_hidden=[32,16]",
                 "data.augment=false", "run.device=cpu", "run.precision=fp32", "optim.lr_adapter=1e-3",
                 "optim.lr_decoder=3e-3", "objective.coarse_warm_epochs=2", "model.decoder.dropout=0.1"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter.safetensors"))


def _interrupted_run(cfg, data, run_dir, monkeypatch, step: int) -> None:
    """Start a run and kill it (KeyboardInterrupt) during optimizer step ``step`` (1-based)."""
    from imedsam.train import losses as loop

    calls = {"n": 0}
    original = loop.BCEDiceLoss.forward

    def crash(self, logits, targets):  # 2 loss calls per step: die in the first call of that step
        calls["n"] += 1
        if calls["n"] == 2 * (step - 1) + 1:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, logits, targets)

    monkeypatch.setattr(loop.BCEDiceLoss, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, data, run_dir)
    monkeypatch.setattr(loop.BCEDiceLoss, "forward", original)


def test_training_decreases_loss_and_writes_a_run(disc_dataset, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(**{"optim.epochs": 6, "run.val_every": 3})
    result = run_training(cfg, disc_dataset, tmp_path / "run")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.85 * losses[0], losses
    for name in ("adapter.safetensors", "best.safetensors", "config.yaml", "run.json",
                 "checkpoints/epoch-0005/train_state.pt", "checkpoints/epoch-0005/adapter.safetensors"):
        assert (tmp_path / "run" / name).exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-0005"]  # older ones removed
    assert "val" in result.history[2] and 0.0 <= result.history[2]["val"]["dice"] <= 1.0
    # the saved adapter holds only trainable tensors and rebuilds the same model
    from imedsam.models.registry import build_system

    system = build_system("imedsam", adapter=tmp_path / "run" / "adapter.safetensors")
    saved = _weights(tmp_path / "run")
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    running = {k for k in saved if k.endswith("running_mean")}
    assert trainable <= set(saved) and running and all(k.startswith("decoder.") for k in running)
    assert set(saved) - trainable == {k for k in saved if k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked"))}
    torch.testing.assert_close(dict(system.decoder.named_buffers())["coarse_trunk.1.running_mean"],
                               saved["decoder.coarse_trunk.1.running_mean"])


def test_resume_after_interruption_reproduces_the_uninterrupted_run(disc_dataset, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _config(**{"optim.epochs": 3, "run.val_every": 10})
    full = run_training(cfg, disc_dataset, tmp_path / "full")
    _interrupted_run(cfg, disc_dataset, tmp_path / "part", monkeypatch, step=12)  # step 12 of 15: epoch 3
    state = torch.load(tmp_path / "part" / "checkpoints" / "epoch-0001" / "train_state.pt", weights_only=True)
    assert int(state["epoch"]) == 1  # epochs 1 and 2 (0-based 0, 1) were saved before the crash
    resumed = run_training(cfg, disc_dataset, tmp_path / "part", resume=True)
    assert resumed.history[-1]["step"] == full.history[-1]["step"] == 15
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_ema_run_keeps_the_average_as_best_and_resumes_exactly(disc_dataset, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    cfg = _config(**{"optim.epochs": 2, "run.val_every": 10, "optim.ema_decay": 0.9})  # validated at the end only
    full = run_training(cfg, disc_dataset, tmp_path / "full")
    state = torch.load(tmp_path / "full" / "checkpoints" / "epoch-0001" / "train_state.pt", weights_only=True)
    assert state["ema"]["steps"] == full.history[-1]["step"] == 10
    best, raw = load_file(str(tmp_path / "full" / "best.safetensors")), _weights(tmp_path / "full")
    shadow = state["ema"]["shadow"]
    for name, value in shadow.items():  # best = the average (validated), adapter = the raw weights
        torch.testing.assert_close(best[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(raw[name], value) for name, value in shadow.items())

    _interrupted_run(cfg, disc_dataset, tmp_path / "part", monkeypatch, step=8)  # step 8 of 10: epoch 2
    run_training(cfg, disc_dataset, tmp_path / "part", resume=True)
    resumed = load_file(str(tmp_path / "part" / "best.safetensors"))
    for name in shadow:
        torch.testing.assert_close(resumed[name], best[name], rtol=0, atol=1e-6, msg=name)


def test_cli_train_then_evaluate_writes_a_report(disc_dataset, tmp_path, capsys):
    from imedsam.cli import main

    run = tmp_path / "cli_run"
    args = ["train", "--data", str(disc_dataset), "--out", str(run), "optim.epochs=1", "optim.max_steps=2",
            "model.backbone=tiny_tinyvit_test", "data.image_size=64", "objective.points_per_image=128",
            "model.decoder.coarse_hidden=[32,16]", "model.decoder.fine_hidden=[16,16]",
            "model.decoder.coarse_feature_dim=8", "run.device=cpu"]
    assert main(args) == 0
    assert main(args) == 2  # the run exists: refuses to overwrite without --resume
    assert "already holds a run" in capsys.readouterr().err
    report = tmp_path / "report"
    assert main(["evaluate", "--run", str(run), "--data", str(disc_dataset), "--out", str(report),
                 "--sweep", "16,48", "--device", "cpu"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert (report / "cases.csv").exists() and (report / "report.html").stat().st_size > 1000
    html = (report / "report.html").read_text()
    # the best, median and worst cases are drawn (their overlays), also with a sweep of output grids
    assert "no overlay given" not in html and html.count("data:image/png;base64") >= 3
    assert summary["config"]["min_component"] == 0 and summary["config"]["tta"] == "id"
    rows = list(csv.DictReader(open(report / "cases.csv")))
    assert {row["gt_components"] for row in rows} == {"1"}  # every ground truth here is one disc
    assert summary["groups"]["by"] == "gt_components" and list(summary["groups"]["values"]) == ["1"]
    filtered = tmp_path / "report_filtered"
    assert main(["evaluate", "--run", str(run), "--data", str(disc_dataset), "--out", str(filtered),
                 "--min-component", "1000000", "--device", "cpu"]) == 0
    summary = json.loads((filtered / "summary.json").read_text())
    assert summary["config"]["min_component"] == 1000000
    # every predicted component is smaller than that: all predictions are empty, so Dice is 0 for every case
    assert all(float(row["dice"]) == 0.0 for row in csv.DictReader(open(filtered / "cases.csv")))
    flipped = tmp_path / "report_tta"
    assert main(["evaluate", "--run", str(run), "--data", str(disc_dataset), "--out", str(flipped),
                 "--tta", "h,v", "--device", "cpu", "--limit", "2"]) == 0
    assert json.loads((flipped / "summary.json").read_text())["config"]["tta"] == "id,h,v"
