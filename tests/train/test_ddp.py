"""Training in 2 processes (torchrun, gloo on CPU) on a tiny random backbone: the same weights as one process on
the same global batch, an exact resume after a process dies, rank 0 alone writes the run, clear refusals."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imedsam.errors import ImedsamError
from imedsam.train import shards
from tests.train.discs import write_discs

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("ddp_runner.py")
#: 11 training images in global batches of 4: steps of 4, 4 and 3 items, so the processes' parts are 2 + 2, then
#: 2 + 1 (unequal); augmentation and box jitter on (seeded per item), dropout off (drawn per process)
OVERRIDES = ["model.backbone=tiny_tinyvit_test", "data.image_size=64", "optim.batch_size=4", "optim.epochs=2",
             "objective.points_per_image=128", "model.decoder.coarse_hidden=[32,16]",
             "model.decoder.coarse_feature_dim=8", "model.decoder.fine_hidden=[16,8]", "model.decoder.dropout=0",
             "run.device=cpu", "run.precision=fp32", "run.val_every=1"]


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    """15 gray 64x64 images with a bright disc (the mask); splits.json 11/2/2."""
    return write_discs(tmp_path_factory.mktemp("discs11"), 15, 11, 2, seed=1)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}", **extra}


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ddp_runner.py train ARGS`` (a free port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(RUNNER),
               "train", *args]
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=300, check=False)


def _imedsam(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imedsam", "train", *args], env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


def _history(run: Path) -> list[dict]:
    state = torch.load(run / "checkpoints" / "epoch-0001" / "train_state.pt", weights_only=True)
    return json.loads(state["history"])


@pytest.fixture(scope="module")
def two_processes(discs, tmp_path_factory):
    """The whole 2-process run, every file write under its folder recorded per rank."""
    base = tmp_path_factory.mktemp("ddp")
    run, audit = base / "run", base / "audit"
    audit.mkdir()
    done = _torchrun(["--data", str(discs), "--out", str(run), *OVERRIDES], IMEDSAM_AUDIT_ROOT=str(run),
                     IMEDSAM_AUDIT_DIR=str(audit))
    assert done.returncode == 0, done.stderr[-3000:]
    return run, audit, done


def _null_space_tensors(run: Path, names) -> set[str]:
    """The decoder tensors whose gradient is zero up to rounding (Adam turns that noise into steps of size lr, so
    two single-process runs on different thread counts differ there too): the Linear layers feeding a
    BatchNorm (their bias and the weight columns of batch-constant inputs: BatchNorm subtracts the batch mean)
    and the running means that follow them."""
    from imedsam.models.registry import build_system

    system = build_system(adapter=run / "adapter.safetensors", pretrained=False)
    out = {n for n in names if n.endswith("running_mean")}
    for name, module in system.named_modules():
        children = list(module.named_children())
        for (a, first), (_, second) in itertools.pairwise(children):
            if isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.BatchNorm1d):
                out |= {f"{name}.{a}.weight", f"{name}.{a}.bias"}
    return out


def _train_mode_outputs(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse and fine logits of the run's model in training mode (BatchNorm on batch statistics, blind to
    the null space above) on a fixed batch of 3 discs and fixed query points."""
    from imedsam.models.registry import build_system
    from imedsam.train.loop import seed_everything

    seed_everything(2023)  # the random frozen backbone of the runs (the adapter file holds the trained tensors)
    system = build_system(adapter=run / "adapter.safetensors", pretrained=False).train()
    yy, xx = np.mgrid[:64, :64]
    masks = torch.tensor(np.stack([(yy - c) ** 2 + (xx - c) ** 2 <= 100 for c in (24, 32, 40)]))[:, None].float()
    images = system.preprocess.normalize_tensor((40 + 150 * masks).repeat(1, 3, 1, 1))
    boxes = torch.tensor([[c - 10, c - 10, c + 11, c + 11] for c in (24, 32, 40)], dtype=torch.float32)
    with torch.no_grad():
        coarse, fine, _ = system.forward_train(images, boxes, masks, n_points=256,
                                               generator=torch.Generator().manual_seed(0))
    return coarse, fine


def test_two_processes_train_as_one_process_on_the_global_batch(discs, two_processes, tmp_path):
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    torch.set_num_threads(1)
    run, _, done = two_processes
    single = run_training(load_config(None, OVERRIDES), discs, tmp_path / "single")
    assert [h["step"] for h in single.history] == [h["step"] for h in _history(run)] == [3, 6]
    # the logged loss is the global batch's: the same as one process's, epoch by epoch
    np.testing.assert_allclose([h["train_loss"] for h in _history(run)],
                               [h["train_loss"] for h in single.history], rtol=1e-5)
    one, two = _weights(tmp_path / "single"), _weights(run)
    assert set(one) == set(two)
    free = _null_space_tensors(run, one)
    assert free and len(free) < len(one) // 4
    for name in sorted(set(one) - free):
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-5, msg=name)
    for name, got in zip(("coarse", "fine"), zip(_train_mode_outputs(run), _train_mode_outputs(tmp_path / "single"))):
        torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-5, msg=name)
    assert done.stdout.count('"run"') == 1  # the result line, printed by rank 0 only


def _volumes(root: Path) -> Path:
    """3 label volumes (6 slices, classes 1 and 2) in the nnU-Net layout, for MA-SAM's stacks."""
    from tests.data.conftest import write_stacks_dataset

    return write_stacks_dataset(root, "t")


#: SAM-Med2D: 3 object masks per image, clicks drawn from the error (both torch.multinomial paths: 1 point and
#: more), an optimizer step per pass; MA-SAM: stacks of 3 slices, the Dice of the global batch (FacT dropout off)
OTHER_SYSTEMS = {
    "sam_med2d": ["model.system=sam_med2d", "objective.masks_per_image=3", "objective.iterations=3",
                  "objective.first_points=[1,3]", "objective.point_choices=[1,3]"],
    "ma_sam": ["model.system=ma_sam", "model.stack_depth=3", "model.decoder.num_classes=2",
               "data.val_fraction=0.34", "model.peft.fact_dropout=0"],
}


@pytest.mark.parametrize("system", sorted(OTHER_SYSTEMS))
def test_the_other_objectives_train_as_one_process_too(system, discs, tmp_path):
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    torch.set_num_threads(1)
    data = discs if system == "sam_med2d" else _volumes(tmp_path / "Dataset004_T")
    overrides = ["model.backbone=tiny_tinyvit_test", "data.image_size=64", "optim.batch_size=4", "optim.epochs=1",
                 "run.device=cpu", "run.precision=fp32", *OTHER_SYSTEMS[system]]
    single = run_training(load_config(None, overrides), data, tmp_path / "single")
    done = _torchrun(["--data", str(data), "--out", str(tmp_path / "two"), *overrides])
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(torch.load(tmp_path / "two" / "checkpoints" / "epoch-0000" / "train_state.pt",
                                weights_only=True)["history"])
    assert [h["step"] for h in two] == [h["step"] for h in single.history] == [3]
    np.testing.assert_allclose(two[0]["train_loss"], single.history[0]["train_loss"], rtol=1e-5)
    one, got = _weights(tmp_path / "single"), _weights(tmp_path / "two")
    assert set(one) == set(got)
    for name in one:  # an attention layer's key bias has a zero gradient up to rounding (softmax is blind to a
        if not name.endswith("k_proj.bias"):  # shift shared by all keys): Adam's steps there are noise
            torch.testing.assert_close(got[name], one[name], rtol=0, atol=2e-5, msg=name)


def test_only_rank_0_writes_the_run_folder(two_processes):
    run, audit, _ = two_processes
    rank0, rank1 = (audit / "writes-0.txt").read_text(), (audit / "writes-1.txt").read_text()
    assert rank1 == ""  # the hook was there (its file exists) and saw nothing
    for name in ("config.yaml", "run.json", "best.safetensors", "adapter.safetensors", "epoch-0001"):
        assert name in rank0
    state = torch.load(run / "checkpoints" / "epoch-0001" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2  # each process's RNG state
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_a_process_killed_mid_epoch_resumes_to_the_uninterrupted_weights(discs, two_processes, tmp_path):
    run = tmp_path / "killed"
    args = ["--data", str(discs), "--out", str(run), *OVERRIDES]
    killed = _torchrun(args, IMEDSAM_KILL_STEP="4")  # rank 1 dies at step 5 of 6 (epoch 2)
    assert killed.returncode != 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-0000"]
    resumed = _imedsam(["--nproc", "2", "--resume", *args])  # the --nproc shortcut, as torchrun
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(two_processes[0]), _weights(run)
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in _history(r)] for r in (run, two_processes[0])]
    assert untimed[0] == untimed[1] and [h["step"] for h in untimed[0]] == [3, 6]  # losses, lr, val: the same


def test_a_resume_on_another_number_of_processes_is_refused(two_processes, discs, tmp_path):
    import shutil

    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    copy = tmp_path / "copy"
    shutil.copytree(two_processes[0], copy)
    with pytest.raises(ImedsamError, match="trained by 2 process"):
        run_training(load_config(None, OVERRIDES), discs, copy, resume=True)


def test_a_global_batch_the_processes_cannot_share_is_refused(discs, tmp_path, capsys, monkeypatch):
    from imedsam.cli import main
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    args = ["train", "--nproc", "2", "--data", str(discs), "--out", str(tmp_path / "run"), *OVERRIDES,
            "optim.batch_size=3"]
    assert main(args) == 2  # refused by the launcher, before any process starts
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.batch_size=3" in err and "divisible by 2" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun process refuses too, before waiting for the others
    with pytest.raises(ImedsamError, match="divisible by 2 \\(e.g. 2 or 4\\)"):
        run_training(load_config(None, OVERRIDES + ["optim.batch_size=3"]), discs, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_each_step_takes_the_single_process_items_split_in_order():
    from torch.utils.data import DataLoader

    single = [b.tolist() for b in DataLoader(range(11), batch_size=4, shuffle=True,
                                              generator=torch.Generator().manual_seed(7 * 1000 + 3))]
    assert shards.global_batches(11, 4, seed=7, epoch=3) == single
    parts = [shards.rank_batches(11, 4, 7, 3, rank, 2) for rank in (0, 1)]
    assert [len(p) for p in parts] == [3, 3]
    for step, batch in enumerate(single):
        (a, sa), (b, sb) = parts[0][step], parts[1][step]
        assert a + b == batch and sa.sizes == sb.sizes == (len(a), len(b)) and sb.offset == len(a)
        assert sa.weight + sb.weight == pytest.approx(1.0)
    assert [len(p) for p in (shards.rank_batches(9, 4, 0, 0, r, 2) for r in (0, 1))] == [2, 2]  # 1 item < 2
    assert shards.steps_per_epoch(9, 4, 2) == 2 and shards.steps_per_epoch(9, 4) == 3
    with pytest.raises(ImedsamError, match="divisible by 4 \\(e.g. 4\\)"):
        shards.per_rank_batch(2, 4)


def test_the_nproc_command_line_drops_nproc_and_keeps_the_rest():
    from imedsam.cli import build_parser
    from imedsam.cli_train import train_argv
    from imedsam.train.launch import torchrun_command

    args = build_parser().parse_args(["-v", "train", "--npr", "2", "--data=d", "--out", "o", "--resume",
                                      "--device", "cpu", "optim.epochs=3"])
    argv = train_argv(args)
    assert argv == ["-v", "train", "--data", "d", "--out", "o", "--resume", "--device", "cpu", "optim.epochs=3"]
    assert torchrun_command(2, argv)[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                               "-m", "imedsam"]
