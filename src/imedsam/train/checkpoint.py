"""Run folders and checkpoints that survive any kill.

A run folder holds::

    config.yaml                    the resolved config the run was started with (never overwritten)
    run.json                       the data folder it trains on, the imedsam version, configs of later resumes
    checkpoints/epoch-NNNN/        one complete checkpoint per kept epoch (the newest is what --resume uses):
        adapter.safetensors        trainable tensors only
        train_state.pt             optimizer, scheduler, epoch, step, best score, history, every RNG state
        MANIFEST.json              written last: the files' sizes and SHA-256
    adapter.safetensors            the newest weights (a copy), for --adapter RUN
    best.safetensors               the weights of the best validation score

A checkpoint is one unit: it is built in a hidden ``checkpoints/.tmp-*`` folder, every file fsynced, the manifest
written last, and the folder renamed into place in one step; the previous complete checkpoint is deleted only
after that. A kill at any moment therefore leaves the previous checkpoint intact (and, at worst, a temporary
folder, removed on the next start). ``--resume`` takes the newest checkpoint whose files match its manifest.
Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write, sha256_file

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
BEST_ADAPTER_FILE = "best.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"


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


# --------------------------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{int(epoch):04d}"


def write_checkpoint(run_dir: Path, epoch: int, write_adapter: Callable[[Path], None], state: dict,
                     keep: int = 1) -> Path:
    """Write ``checkpoints/epoch-NNNN`` as one unit (module docstring) and return it; afterwards keep only the
    ``keep`` newest complete checkpoints. ``write_adapter(path)`` writes the adapter file."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(epoch)
    tmp = root / f".tmp-{checkpoint_name(epoch)}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write_adapter(tmp / ADAPTER_FILE)
        torch.save(state, tmp / STATE_FILE)
        files = {}
        for name in (ADAPTER_FILE, STATE_FILE):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"epoch": int(epoch), "step": int(state.get("step", -1)), "files": files},
                                       indent=1))
        with open(manifest, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same epoch again (a resumed, repeated epoch): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(folder: Path, verify: bool = True) -> bool:
    """Whether a checkpoint folder has its manifest and files of the recorded sizes (and hashes with ``verify``)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != info["bytes"] or (verify and sha256_file(path) != info["sha256"]):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (sizes checked; hashes by :func:`latest`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch-"))
    return [p for p in folders if is_complete(p, verify=False)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files also match their SHA-256 (a damaged one is skipped, logged)."""
    for folder in reversed(complete_checkpoints(run_dir)):
        if is_complete(folder, verify=True):
            return folder
        log.warning("checkpoint %s does not match its manifest; trying an older one", folder)
    return None


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what an interrupted write left behind: ``checkpoints/.tmp-*`` folders and ``.<name>.<hex>.tmp*``
    files of atomic writes in the run folder. Returns the removed names."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"{CHECKPOINTS}/{p.name}")
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_file() and p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted write: %s", len(removed), ", ".join(removed))
    return removed


def has_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a started run (its config record, a checkpoint, or a first-format state)."""
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE).exists() or bool(complete_checkpoints(run_dir)) or (run_dir / STATE_FILE).exists()
