"""SIGKILL at any moment of a training run, inside every kind of file write, then `--resume`: the run ends
bit-identical to the uninterrupted one, with no temporary file left (issue: a checkpoint that survives any kill)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.train.test_training import disc_dataset  # noqa: F401  (fixture)

RUNNER = Path(__file__).with_name("kill_runner.py")
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "--data", "{data}", "--out", "{out}", "model.backbone=tiny_tinyvit_test", "data.image_size=64",
        "optim.batch_size=4", "optim.epochs=3", "objective.points_per_image=128",
        "model.decoder.coarse_hidden=[32,16]", "model.decoder.coarse_feature_dim=8", "model.decoder.fine_hidden=[16,8]",
        "data.augment=false", "run.device=cpu", "run.precision=fp32", "run.val_every=1"]

#: where to die: inside each kind of write (before renames, after a file's bytes, half-written files) and at
#: random times (seeded below)
CALL_KILLS = ([f"call:os.replace:{n}" for n in range(1, 15)] + [f"call:torch.save:{n}:half" for n in (1, 2, 3)]
              + [f"call:save_file:{n}" for n in (2, 6)] + [f"call:save_file:{n}:half" for n in (1, 4)]
              + [f"call:os.fsync:{n}" for n in (3, 9)])


def _run(data, out, spec: str = "", resume: bool = False) -> int:
    argv = [a.format(data=data, out=out) for a in ARGS] + (["--resume"] if resume else [])
    env = {**os.environ, "KILL_SPEC": spec, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.run([sys.executable, str(RUNNER), *argv], env=env, capture_output=True, timeout=600).returncode


@pytest.fixture(scope="module")
def reference(disc_dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("kill") / "whole"
    assert _run(disc_dataset, out) == 0
    return load_file(str(out / "adapter.safetensors")), load_file(str(out / "best.safetensors"))


def _check(out: Path, reference) -> None:
    weights, best = reference
    got, got_best = load_file(str(out / "adapter.safetensors")), load_file(str(out / "best.safetensors"))
    assert set(got) == set(weights) and all(bool((got[k] == weights[k]).all()) for k in weights)
    assert set(got_best) == set(best) and all(bool((got_best[k] == best[k]).all()) for k in best)
    left = [p.name for p in out.rglob("*") if p.name.startswith(".")]
    assert not left, left
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0002"]


def test_kills_inside_every_write_resume_exactly(disc_dataset, tmp_path, reference):  # noqa: F811
    killed = 0
    for i, spec in enumerate(CALL_KILLS):
        out = tmp_path / f"call{i}"
        code = _run(disc_dataset, out, spec)
        killed += code == -9
        assert code in (0, -9), spec
        assert _run(disc_dataset, out, resume=True) == 0, spec
        _check(out, reference)
    assert killed >= 20  # the kill points really are inside the run


def test_kills_at_random_times_resume_exactly(disc_dataset, tmp_path, reference):  # noqa: F811
    rng = np.random.default_rng(7)
    for i, delay in enumerate(rng.uniform(2.0, 12.0, size=4)):
        out = tmp_path / f"time{i}"
        assert _run(disc_dataset, out, f"time:{delay:.2f}") in (0, -9)
        assert _run(disc_dataset, out, resume=True) == 0  # a resume of any state finishes the run
        _check(out, reference)
