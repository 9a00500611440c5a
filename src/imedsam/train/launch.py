"""``imedsam train --nproc N``: start N training processes on this machine, as
``torchrun --standalone --nproc-per-node N -m imedsam train ...`` would (the same arguments less ``--nproc``).

The launching process checks what it can before starting anything (config, output folder, global batch, GPUs),
so bad input ends with one line and status 2 as usual; then it runs ``python -m torch.distributed.run`` (the
module behind ``torchrun``) and returns its exit status. ``--standalone`` picks a free rendezvous port on
localhost. Several nodes: run torchrun yourself (README: Training on many GPUs and nodes).
"""

from __future__ import annotations

import logging
import subprocess
import sys

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``imedsam <argv>`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", "imedsam", *argv]


def check_processes(nproc: int, device_name: str) -> None:
    """Refuse, before starting them, ``nproc`` processes that cannot run: more than one GPU each or a device
    without a multi-process backend (:func:`imedsam.train.distributed.process_device`)."""
    import torch

    from imedsam.train.distributed import process_device

    if str(device_name).lower() in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if nproc > count:
            raise ImedsamError(f"--nproc {nproc}: this machine has {count} GPU(s); use at most {count} processes "
                               "(one per GPU), or --device cpu")
        return
    process_device(device_name, 0)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``imedsam <argv>`` in ``nproc`` processes (module docstring); the exit status of torchrun."""
    command = torchrun_command(nproc, argv)
    log.info("starting %d processes: %s", nproc, " ".join(command))
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:  # torchrun got the signal too and stops its processes
        return 130
