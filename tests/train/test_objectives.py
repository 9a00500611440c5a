"""SAM-Med2D's iterative-click objective on a tiny random backbone: error-region clicks, passes and optimizer
steps, gradients to the mask-prompt branch, loss decreasing, and a whole run through the generic loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imedsam.models.sammed2d import SamMed2DConfig, build_sammed2d
from imedsam.train.config import load_config
from imedsam.train.objectives import OBJECTIVES, get_objective
from imedsam.train.objectives.iterative_clicks import IterativeClickObjective, error_points, foreground_points
from tests.train.test_training import disc_dataset  # noqa: F401  (fixture)


def test_error_points_lie_in_the_error_region_with_labels_by_type():
    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    pred = gt.clone()
    pred[0, 4:12, 4:8] = False  # mask 0: false negatives only
    pred[1, 0:3, :] = True  # mask 1: false positives only
    # mask 2: perfect
    g = torch.Generator().manual_seed(0)
    pts, labels = error_points(pred, gt, 9, g)
    assert pts.shape == (3, 9, 2) and labels.shape == (3, 9)
    x, y = pts[..., 0].long(), pts[..., 1].long()
    assert torch.all(gt[0, y[0], x[0]] & ~pred[0, y[0], x[0]]) and torch.all(labels[0] == 1)
    assert torch.all(pred[1, y[1], x[1]] & ~gt[1, y[1], x[1]]) and torch.all(labels[1] == 0)
    assert torch.all(labels[2] == -1)  # no error: padding points
    fp, fl = foreground_points(gt, g)
    assert torch.all(gt[torch.arange(3), fp[:, 0, 1].long(), fp[:, 0, 0].long()]) and torch.all(fl == 1)
    fp, fl = foreground_points(gt, g, 5)  # as the points:5 test: 2 foreground, 3 background
    assert fl.tolist() == [[1, 1, 0, 0, 0]] * 3
    inside = gt[torch.arange(3)[:, None], fp[..., 1].long(), fp[..., 0].long()]
    assert torch.equal(inside, fl == 1)


def _settings(**extra):
    overrides = ["model.system=sam_med2d", "model.backbone=tiny_tinyvit_test", "data.image_size=64",
                 "optim.batch_size=2", "run.device=cpu", "run.precision=fp32", "objective.masks_per_image=3",
                 "objective.iterations=4", "optim.lr_decoder=1e-3", "optim.lr_adapter=1e-3", "data.augment=false"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def _batch(b: int = 2, m: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    images, masks, boxes = [], [], []
    for _ in range(b):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 16)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images.append(np.repeat((40 + 150 * disc)[None], 3, 0).astype(np.float32))
        masks.append(np.repeat(disc[None], m, 0).astype(np.float32))
        box = [xx[disc].min(), yy[disc].min(), xx[disc].max() + 1, yy[disc].max() + 1]
        boxes.append([box] * m)
    return {"image": torch.tensor(np.stack(images)), "masks": torch.tensor(np.stack(masks)),
            "boxes": torch.tensor(np.array(boxes), dtype=torch.float32)}


def test_passes_steps_and_gradients_reach_the_mask_prompt_branch():
    assert OBJECTIVES["iterative_clicks"] is IterativeClickObjective and get_objective("iterative_clicks")
    cfg = _settings()
    torch.manual_seed(0)
    system = build_sammed2d(cfg.model, pretrained=False)
    objective = IterativeClickObjective(system, cfg, torch.device("cpu"), None)
    system.train()
    logs, grads = [], []
    for loss, log in objective.steps(_batch(), epoch=0, step=0):
        system.zero_grad()
        loss.backward()
        logs.append(log)
        md = system.prompt_encoder.mask_downscaling[6].weight.grad  # (the 1-channel LN of the tiny config
        # blocks the first conv; the real models have 4 channels there)
        adapters = [p for n, p in system.named_parameters() if ".mlp_parallel.med2d." in n]
        grads.append((md is not None and float(md.abs().sum()) > 0,
                      any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in adapters)))
    assert [log["pass"] for log in logs] == [0, 1, 2, 3, 4]  # 1 + iterations optimizer steps
    assert grads[0] == (False, True)  # first pass: no mask prompt; the encoder adapters learn
    assert all(g[0] and not g[1] for g in grads[1:])  # decoder-only passes: the mask branch learns (F.24 fixed)
    summed = IterativeClickObjective(system, _settings(**{"objective.step_per_pass": "false"}),
                                     torch.device("cpu"), None)
    assert len(list(summed.steps(_batch(), epoch=0, step=0))) == 1


def test_the_loss_decreases_on_a_fixed_batch():
    cfg = _settings(**{"objective.iterations": 2})
    torch.manual_seed(0)
    system = build_sammed2d(cfg.model, pretrained=False)
    objective = IterativeClickObjective(system, cfg, torch.device("cpu"), None)
    opt = torch.optim.Adam([p for p in system.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(seed=1)
    system.train()
    first = None
    for step in range(25):
        losses = []
        for loss, _ in objective.steps(batch, epoch=0, step=0):  # step=0: the same prompts every time
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        first = first if first is not None else np.mean(losses)
    assert np.mean(losses) < 0.7 * first


def test_a_run_trains_validates_on_box_and_one_point_and_reloads(disc_dataset, tmp_path):  # noqa: F811
    from imedsam.models.registry import build_system
    from imedsam.train.api import run_training

    cfg = _settings(**{"optim.epochs": 2, "run.val_every": 1})
    result = run_training(cfg, disc_dataset, tmp_path / "run")
    hist = result.history
    assert len(hist) == 2 and set(hist[-1]["val"]["by_protocol"]) == {"box", "points:1"}
    assert hist[-1]["step"] == 2 * 5  # 10 training images, 2 per step
    saved = json.loads(json.dumps(hist))  # JSON-able
    assert saved[0]["train_loss"] > 0
    system = build_system(adapter=tmp_path / "run", pretrained=False)
    assert system.name == "sam_med2d" and system.config.peft.adapter_dim is None  # paper default, resolved at use
    with pytest.raises(Exception):
        run_training(cfg, disc_dataset, tmp_path / "run")  # an existing run needs --resume


def test_sammed2d_config_from_yaml_reaches_every_option(tmp_path):
    cfg = _settings(**{"model.peft.adapter_dim": 8, "model.peft.se_reduction": 2, "model.peft.zero_init": "false",
                       "model.multimask_output": "false", "objective.point_choices": "[1, 2]"})
    assert isinstance(cfg.model, SamMed2DConfig) and cfg.model.peft.adapter_dim == 8
    assert cfg.objective.point_choices == (1, 2) and not cfg.model.multimask_output
    from imedsam.errors import ImedsamError

    with pytest.raises(ImedsamError, match=r"objective\.point_choices"):
        _settings(**{"objective.point_choices": "[0]"})
    with pytest.raises(ImedsamError, match=r"model\.peft\.adapter_dm: unknown key"):
        _settings(**{"model.peft.adapter_dm": 8})


def test_an_interrupted_run_resumes_to_the_same_weights(disc_dataset, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    from imedsam.train.api import run_training
    from imedsam.train.objectives import iterative_clicks

    cfg = _settings(**{"optim.epochs": 2, "objective.iterations": 2, "run.val_every": 2})
    run_training(cfg, disc_dataset, tmp_path / "whole")
    calls = {"n": 0}
    original = iterative_clicks.focal_loss

    def crash(*args, **kwargs):  # 3 passes per step: die in the second pass of step 7 (epoch 2)
        calls["n"] += 1
        if calls["n"] == 3 * 6 + 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(iterative_clicks, "focal_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, disc_dataset, tmp_path / "cut")
    monkeypatch.setattr(iterative_clicks, "focal_loss", original)
    run_training(cfg, disc_dataset, tmp_path / "cut", resume=True)
    a, b = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                      "adapter.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
