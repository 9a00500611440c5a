"""FacT (factor-tuning, tensor-train form) on the q and v projections, as MA-SAM (systems.md §C.2).

For every adapted attention block ``l`` and projection ``t`` in (q, v)::

    out[..., cols(t)] += s * V(dropout(Sigma_t^(l)(U(x))))

* ``U``: ``Linear(d -> r, bias=False)``, default (Kaiming-uniform) init, and ``V``: ``Linear(r -> d, bias=False)``,
  **zero** init, shared by every block of width ``d`` and by q and v (MA-SAM: one pair for the whole ViT);
* ``Sigma_t^(l)``: a per-block, per-projection ``Linear(r -> r, bias=False)`` core, default init;
* ``s`` the scale (1.0), dropout 0.1, rank ``r`` 32 in MA-SAM.

With ``V`` at zero the adapted projection is the frozen one at initialisation. On TinyViT the stage widths differ
(128, 160, 320 on LiteMedSAM), so there is one ``(U, V)`` pair per width, shared by the blocks of that width.

The shared factors live in a :class:`FacTFactors` module that the *system* owns (``fact.factors.<d>.u/v``); each
block's :class:`FacTQKV` (at the ``qkv`` insertion point: ``...attn.qkv.base`` frozen, ``...attn.qkv.cores.{q,v}``)
holds a reference to its pair without registering it, so every shared tensor is saved once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.peft.columns import add_low_rank

__all__ = ["FacTFactors", "FacTQKV", "attach_fact"]


class FacTFactors(nn.Module):
    """The shared ``U`` (d -> r) and ``V`` (r -> d, zero) of every width ``d`` present; keys ``factors.<d>.u/v``."""

    def __init__(self, widths: Sequence[int], rank: int) -> None:
        super().__init__()
        if int(rank) < 1:
            raise ImedsamError(f"FacT rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.factors = nn.ModuleDict()
        for d in sorted(set(int(w) for w in widths)):
            pair = nn.Module()
            pair.u = nn.Linear(d, self.rank, bias=False)
            pair.v = nn.Linear(self.rank, d, bias=False)
            nn.init.zeros_(pair.v.weight)
            self.factors[str(d)] = pair

    def pair(self, width: int) -> nn.Module:
        return self.factors[str(int(width))]


class FacTQKV(nn.Module):
    """A frozen fused qkv ``nn.Linear`` plus FacT updates on the ``targets`` columns (module docstring).

    Args:
        base: the fused projection; frozen and kept as ``self.base``.
        factors: the shared pair of this width (``FacTFactors.pair(d)``), referenced, not registered.
        columns: ``{target: output column indices}`` (from the attention's ``qkv_channel_index``).
        scale, dropout: ``s`` and the dropout on the core's output.

    Shapes: ``(N, ..., d) -> (N, ..., n_out)``; exactly ``base(x)`` while ``V`` is zero.
    """

    def __init__(self, base: nn.Linear, factors: nn.Module, columns: dict[str, torch.Tensor], *, scale: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ImedsamError(f"FacTQKV wraps an nn.Linear, got {type(base).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ImedsamError(f"FacT dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        object.__setattr__(self, "_factors", factors)  # shared: owned (and saved) by FacTFactors
        rank = factors.u.out_features
        ref = base.weight
        self.cores = nn.ModuleDict({t: nn.Linear(rank, rank, bias=False, device=ref.device, dtype=ref.dtype)
                                    for t in columns})
        self.targets = tuple(columns)
        for t, cols in columns.items():
            self.register_buffer(f"_cols_{t}", cols.to(ref.device), persistent=False)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def pointwise(self) -> bool:
        """Every token is mapped on its own (windowed attention may skip projecting the padding)."""
        return True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        u = self._factors.u(x)
        # one GEMM accumulated into the base output (imedsam.peft.columns); V shared by the targets
        v = self._factors.v.weight * self.scale
        return add_low_rank(out, [self.dropout(self.cores[t](u)) for t in self.targets], [v] * len(self.targets),
                            [getattr(self, f"_cols_{t}") for t in self.targets])

    def extra_repr(self) -> str:
        return f"rank={self.cores[self.targets[0]].in_features}, targets={''.join(self.targets)}, scale={self.scale:g}"


def attach_fact(encoder: nn.Module, factors: FacTFactors, *, targets: Sequence[str] = ("q", "v"), scale: float = 1.0,
                dropout: float = 0.1, blocks: Sequence[int] | None = None) -> list[int]:
    """Replace ``attn.qkv`` of the selected attention blocks by :class:`FacTQKV` sharing ``factors``; returns the
    block indices. ``factors`` must hold a pair for every width of those blocks."""
    from imedsam.peft.backbone import attention_blocks, block_width

    all_blocks = attention_blocks(encoder)
    selected = list(range(len(all_blocks))) if blocks is None else sorted(set(blocks))
    bad = [i for i in selected if not 0 <= i < len(all_blocks)]
    if bad:
        raise ImedsamError(f"FacT blocks {bad} out of range: the encoder has {len(all_blocks)} attention blocks")
    for i in selected:
        attn = all_blocks[i].attn
        columns = {t: attn.qkv_channel_index(t) for t in targets}
        attn.qkv = FacTQKV(attn.qkv, factors.pair(block_width(all_blocks[i])), columns, scale=scale,
                           dropout=dropout)
    return selected
