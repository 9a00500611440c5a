"""Run `imedsam` in one torchrun process, watched (the multi-process tests' script).

IMEDSAM_AUDIT_ROOT and IMEDSAM_AUDIT_DIR: record every file operation that writes under the root (opening for
writing, renaming, creating or removing files and folders; Python's audit events) to
``IMEDSAM_AUDIT_DIR/writes-<RANK>.txt``, one path per line. IMEDSAM_KILL_STEP=S: the process of rank
IMEDSAM_KILL_RANK (default 1) kills itself with SIGKILL as it starts optimizer step S (0-based).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

torch.set_num_threads(1)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 1, "os.mkdir": 1, "os.rmdir": 1, "shutil.rmtree": 1, "os.truncate": 1,
                "os.chmod": 1, "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2}


def _audit(root: str, out_dir: str) -> None:
    root = os.path.abspath(root)
    sink = open(os.path.join(out_dir, f"writes-{os.environ.get('RANK', 'none')}.txt"), "a",  # noqa: SIM115
                buffering=1)  # open for the process's life: opened before the hook, so not recorded itself

    def inside(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            paths = [path] if writes else []
        elif event in _PATH_EVENTS:
            paths = list(args[:_PATH_EVENTS[event]])
        else:
            return
        for path in paths:
            if inside(path):
                sink.write(f"{event} {os.fsdecode(path)}\n")

    sys.addaudithook(hook)


def _arm_kill(step: int) -> None:
    from imedsam.train.objectives.implicit_points import ImplicitPointsObjective

    original = ImplicitPointsObjective.steps

    def steps(self, batch, *, epoch, step, **kwargs):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        yield from original(self, batch, epoch=epoch, step=step, **kwargs)

    kill_step = step
    ImplicitPointsObjective.steps = steps


if __name__ == "__main__":
    if os.environ.get("IMEDSAM_AUDIT_ROOT"):
        _audit(os.environ["IMEDSAM_AUDIT_ROOT"], os.environ["IMEDSAM_AUDIT_DIR"])
    if os.environ.get("IMEDSAM_KILL_STEP") and os.environ.get("RANK") == os.environ.get("IMEDSAM_KILL_RANK", "1"):
        _arm_kill(int(os.environ["IMEDSAM_KILL_STEP"]))
    from imedsam.cli import main

    sys.exit(main(sys.argv[1:]))
