"""Run `imedsam train` and kill this process with SIGKILL at a chosen moment (the kill tests' subprocess).

KILL_SPEC: ``call:<what>:<n>[:half]`` kills at the n-th call of ``what`` (``os.replace``, ``torch.save``,
``save_file``, ``os.fsync``): before a rename, or, for the writers, after writing the file (``half``: after writing
half of it); ``time:<seconds>`` kills after that delay; empty: no kill.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

torch.set_num_threads(1)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(spec: str) -> None:
    if spec.startswith("time:"):
        threading.Timer(float(spec.split(":")[1]), _die).start()
        return
    if not spec.startswith("call:"):
        return
    parts = spec.split(":")
    what, n, half = parts[1], int(parts[2]), len(parts) > 3
    import safetensors.torch

    owner, attr = {"os.replace": (os, "replace"), "torch.save": (torch, "save"), "os.fsync": (os, "fsync"),
                   "save_file": (safetensors.torch, "save_file")}[what]
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != n:
            return original(*args, **kwargs)
        if what in ("torch.save", "save_file"):
            original(*args, **kwargs)  # the bytes are on disk; the rename never comes
            if half:
                path = args[1] if what == "torch.save" else (args[1] if len(args) > 1 else kwargs["filename"])
                size = os.path.getsize(path)
                with open(path, "r+b") as fh:
                    fh.truncate(size // 2)
        _die()

    setattr(owner, attr, wrapped)


if __name__ == "__main__":
    _arm(os.environ.get("KILL_SPEC", ""))
    from imedsam.cli import main

    sys.exit(main(sys.argv[1:]))
