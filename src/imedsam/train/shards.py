"""Which items each process trains on, and what an objective needs to act on its part of a global batch.

Global batch semantics: ``optim.batch_size`` is the batch of one optimizer step over all processes. Step ``s`` of
epoch ``e`` takes the same items in every launch: the indices the single-process loop's shuffled DataLoader
gives (:func:`global_batches`), which each of ``W`` processes splits into contiguous parts (``batch_size / W``
items each; the last, smaller batch of an epoch as evenly as possible). Item ``i`` is augmented from
``(seed, epoch, i)`` by the dataset, whichever process reads it.

An objective that is handed a :class:`Shard` returns its process's *share* of the global-batch loss (the losses
of the processes sum to the loss of the global batch, e.g. ``(size / total) * mean over its items``); the loop
sums the gradients over the processes (:mod:`imedsam.train.sync`). Random draws the objective makes for a whole
batch (query points, clicks) are made for the global batch and sliced (:meth:`Shard.embed`,
:meth:`Shard.gather`, :meth:`Shard.take`), so each item gets the draws it gets in a single process.

An epoch's last batch with fewer items than processes is skipped in a multi-process run (a process cannot step
on no item); :func:`steps_per_epoch` counts without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from imedsam.errors import ImedsamError


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Items per process and step; refuses a global batch that the processes cannot share equally."""
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        choices = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ImedsamError(f"optim.batch_size={global_batch} is the global batch of {world_size} processes: it must "
                           f"be divisible by {world_size} (e.g. {choices})")
    return global_batch // world_size


def split_sizes(total: int, world_size: int) -> tuple[int, ...]:
    """Contiguous part sizes of ``total`` items over ``world_size`` processes, the first ones one larger."""
    return tuple(total // world_size + (r < total % world_size) for r in range(world_size))


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The item indices of every step of ``epoch``: exactly those of the single-process loop's
    ``DataLoader(shuffle=True, generator=seed * 1000 + epoch, drop_last=False)`` (the same DataLoader draws
    them, so the order follows whatever that DataLoader does with its generator)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    return [batch.tolist() for batch in loader]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch of ``n`` items: ``ceil(n / batch_size)`` less a last batch smaller than the
    number of processes (module docstring)."""
    steps = math.ceil(n / batch_size)
    tail = n % batch_size
    return steps - 1 if world_size > 1 and 0 < tail < world_size else steps


@dataclass(frozen=True)
class Shard:
    """This process's part of one global batch: items ``[offset, offset + size)`` of its ``total`` items.

    ``sizes`` holds every process's part size (rank order). "Rows" below are the first axis of a tensor with
    ``per_item`` rows per item (e.g. the M object masks of each image).
    """

    rank: int
    sizes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def weight(self) -> float:
        """This part's share of a per-item mean over the global batch: ``size / total``."""
        return self.size / self.total

    def take(self, rows: torch.Tensor, per_item: int = 1) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        return rows[self.offset * per_item:(self.offset + self.size) * per_item]

    def embed(self, rows: torch.Tensor, per_item: int = 1, fill: float | bool = 0) -> torch.Tensor:
        """A global-batch tensor holding this process's ``rows`` at their place and ``fill`` elsewhere (no
        communication): for random draws whose amount depends only on the tensor's shape (``torch.multinomial``),
        made on the global shape and then :meth:`take`-n, so each row gets its single-process draws."""
        out = rows.new_full((self.total * per_item, *rows.shape[1:]), fill)
        out[self.offset * per_item:(self.offset + self.size) * per_item] = rows
        return out

    def gather(self, rows: torch.Tensor, per_item: int = 1) -> torch.Tensor:
        """The global-batch tensor of every process's ``rows`` (an all-gather; no gradient): for random draws
        whose amount depends on the data."""
        most = max(self.sizes) * per_item
        padded = rows.new_zeros((most, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[: n * per_item] for part, n in zip(parts, self.sizes)])

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the processes, differentiable (:func:`imedsam.train.sync.all_reduce_sum`)."""
        from imedsam.train.sync import all_reduce_sum

        return all_reduce_sum(value)


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int,
                 world_size: int) -> list[tuple[list[int], Shard]]:
    """This process's item indices and :class:`Shard` for every step of ``epoch`` (module docstring)."""
    out = []
    for batch in global_batches(n, batch_size, seed, epoch):
        if len(batch) < world_size:
            continue
        shard = Shard(rank=rank, sizes=split_sizes(len(batch), world_size))
        out.append((batch[shard.offset:shard.offset + shard.size], shard))
    return out
