"""Run folders: ``adapter.safetensors`` (trainable tensors only) + ``config.yaml`` + ``train_state.pt``.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so an interrupted
write never leaves a truncated checkpoint. ``train_state.pt`` holds the optimizer, scheduler, epoch, step, best
validation score and all RNG states, and is read back with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write

ADAPTER_FILE = "adapter.safetensors"
BEST_ADAPTER_FILE = "best.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.pt"


def save_yaml(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False)))


def rng_state() -> dict:
    """All RNG states (python, numpy, torch CPU and CUDA) as tensors/ints, loadable with weights_only=True."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python_version": py[0], "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": -1.0 if py[2] is None else float(py[2]),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    gauss = None if state["python_gauss"] == -1.0 else state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ImedsamError(f"--resume: no {STATE_FILE} in {path.parent}; start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ImedsamError(f"--resume: cannot read {path} ({exc.__class__.__name__}); "
                           "delete it to restart the run from scratch") from None
