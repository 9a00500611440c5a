import random

import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.train import checkpoint as ckpt


def test_rng_state_round_trip(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = ckpt.rng_state()
    ckpt.save_train_state(tmp_path / "s.pt", {"rng": state, "epoch": 4})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_train_state(tmp_path / "s.pt")
    ckpt.set_rng_state(loaded["rng"])
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b and loaded["epoch"] == 4


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    ckpt.atomic_write(target, lambda t: t.write_text("one"))
    with pytest.raises(RuntimeError):
        def boom(t):
            t.write_text("partial")
            raise RuntimeError("crash during write")
        ckpt.atomic_write(target, boom)
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_corrupt_state_is_a_user_error(tmp_path):
    (tmp_path / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ImedsamError, match="cannot read"):
        ckpt.load_train_state(tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ImedsamError, match="no train_state.pt"):
        ckpt.load_train_state(tmp_path / "none" / ckpt.STATE_FILE)
