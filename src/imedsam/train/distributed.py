"""The processes of a multi-process training run (torchrun): join, ranks, host-side collectives, leave.

``torchrun --nproc-per-node N -m imedsam train ...`` (or ``imedsam train --nproc N``) starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`session` reads them and joins the process group: nccl with one GPU per process (``cuda:LOCAL_RANK``) on
CUDA, gloo on CPU. Without these variables, or with ``WORLD_SIZE=1``, it does nothing and the run is the plain
single-process run, bit for bit.

Conventions:

* rank 0 is the main process: it alone writes the run folder, logs at INFO level and prints the result; the
  others log warnings and errors only.
* host objects (RNG states, the checkpoint to resume, epoch records, errors) travel over a gloo group, the
  *host group*, so that waiting for rank 0 (validation, checkpoint writing) holds no GPU collective and is bounded
  by :data:`HOST_TIMEOUT` rather than by NCCL's timeout.
* :func:`on_main` runs a function on rank 0 and hands its result, or its error, to every rank: a user error on
  rank 0 (a run folder that already holds a run ...) ends every process with the same one-line message instead of
  leaving the others waiting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from imedsam.errors import ImedsamError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long a process waits for the others on the host group (rank 0 validating and writing a checkpoint)
HOST_TIMEOUT = timedelta(hours=2)
#: environment variables torchrun sets for each process
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """One process of a multi-process run: its rank among ``world_size``, its device, the two groups."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    host_group: Any  # a gloo ProcessGroup
    #: the level of the "imedsam" logger before a non-main process quieted it (restored by teardown)
    log_level: int = logging.NOTSET

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ImedsamError(f"WORLD_SIZE={text!r}: expected a whole number (torchrun sets it)") from None


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return env_world_size() > 1


def process_device(name: str, local_rank: int) -> torch.device:
    """The device of process ``local_rank`` on its node for ``run.device`` ``name``: ``cuda:LOCAL_RANK`` for
    ``auto`` or ``cuda`` where CUDA is available, else the CPU."""
    base = str(name).lower()
    if base == "auto":
        base = "cuda" if torch.cuda.is_available() else "cpu"
    if base.startswith("cuda:"):
        raise ImedsamError(f"run.device {name}: a multi-process run gives each process the GPU of its LOCAL_RANK; "
                           "use cuda or auto (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise ImedsamError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ImedsamError(f"LOCAL_RANK {local_rank}: this node has {count} GPU(s); start at most {count} "
                               "processes per node (--nproc-per-node / --nproc)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if base == "cpu":
        return torch.device("cpu")
    raise ImedsamError(f"run.device {name}: multi-process training runs on cuda (nccl) or cpu (gloo)")


def setup(device_name: str) -> DistContext | None:
    """Join the process group torchrun describes in the environment (module docstring); None when this is a
    single process. Non-main processes log warnings only from here on."""
    world = env_world_size()
    if world <= 1:
        return None
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ImedsamError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with torchrun "
                           "(or imedsam train --nproc N)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = process_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ImedsamError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"RANK={rank} WORLD_SIZE={world}")
    host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    package_log = logging.getLogger("imedsam")
    level = package_log.level
    if rank != 0:
        package_log.setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), this is rank %d on %s", world, backend, rank, device)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                       host_group=host_group, log_level=level)


def teardown(ctx: DistContext | None, owned: bool = True) -> None:
    """Leave the process group (``owned``: it was created by :func:`setup`)."""
    if ctx is None:
        return
    logging.getLogger("imedsam").setLevel(ctx.log_level)
    dist.destroy_process_group(ctx.host_group)
    if owned and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device_name: str) -> Iterator[DistContext | None]:
    """``with session(cfg.run.device) as ctx:`` joins the group on entry (None: a single process) and leaves it
    on exit, also after an error. A group that was already initialised by the caller is left as it was."""
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = setup(device_name)
    try:
        yield ctx
    finally:
        teardown(ctx, owned)


def broadcast_object(ctx: DistContext, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled, over the host group)."""
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.host_group)
    return box[0]  # type: ignore[return-value]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (over the host group)."""
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.host_group)
    return out


def on_main(ctx: DistContext | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 and its result on every rank (a single process: just ``fn()``). An error of ``fn``
    reaches every rank: an :class:`ImedsamError` as the same error, anything else as a RuntimeError naming it
    (rank 0 re-raises the original with its traceback). The other ranks wait on the host group meanwhile."""
    if ctx is None:
        return fn()
    result: Any = None
    error: tuple[str, str] | None = None
    original: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except ImedsamError as exc:
            error, original = ("user", str(exc)), exc
        except BaseException as exc:  # noqa: BLE001 - told to the others, then re-raised here
            error, original = ("internal", f"{exc.__class__.__name__}: {exc}"), exc
    kind_result = broadcast_object(ctx, ("error", error) if error else ("ok", result))
    if kind_result[0] == "ok":
        return kind_result[1]
    if original is not None:
        raise original
    kind, message = kind_result[1]
    if kind == "user":
        raise ImedsamError(message)
    raise RuntimeError(f"rank 0 failed: {message}")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of the global RNGs (dropout) of process ``rank``: ``seed`` on rank 0, so rank 0 draws as a single
    process would, and distinct seeds elsewhere so that processes draw independent dropout masks."""
    return int(seed) + 1_000_003 * int(rank)
