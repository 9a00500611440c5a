"""Low-rank adaptation (LoRA) of a fused ``qkv`` projection.

A frozen ``nn.Linear`` that computes queries, keys and values in one matrix product is wrapped by
:class:`LoRAQKV`, which adds a trainable low-rank update to a subset of the q, k, v output columns (q and v by
default, as in I-MedSAM and most SAM adaptations)::

    out = base(x)
    out[..., cols(t)] += s * B_t(A_t(dropout(x)))          for every target t in targets

* ``A_t``: ``Linear(in_features -> rank, bias=False)``, Kaiming-uniform (a = sqrt(5), PyTorch's default).
* ``B_t``: ``Linear(rank -> width_t, bias=False)``, **zero**, so the wrapped layer is an exact no-op at
  initialisation: its output equals ``base(x)`` bit for bit.
* ``s``: ``alpha / rank`` (plain LoRA; ``alpha`` defaults to ``rank``, i.e. ``s = 1`` and ``W' = W + BA``), or,
  with ``gate=True``, the input-dependent gate of the I-MedSAM reference code (systems.md §A.3, §F.12)::

      g = w_g . mean_tokens(x)          w_g: Linear(in_features -> 1, bias=False), default init

  shared by all targets of the layer, and then **no** ``alpha / rank`` factor. The mean is taken over every
  axis of ``x`` except the first (batch) and the last (channels), *as the tensor arrives*. In a SAM ViT block
  with window attention the qkv input is the windowed tensor ``(B * n_windows, ws, ws, C)``, so the mean is per
  window and includes the zero-padded tokens of the border windows; in a global block it is per image. That is
  what the reference code does; it is reproduced, not endorsed.

Two output layouts are supported:

* **contiguous** ``[q | k | v]`` (segment-anything's ``ImageEncoderViT``): ``out_features = 3 * dim`` and
  target ``t`` owns the columns ``[i * dim, (i + 1) * dim)``, i = 0, 1, 2 for q, k, v. Used when
  ``num_heads`` is not given.
* **per-head interleaved** (TinyViT, LiteMedSAM / MobileSAM): the output is viewed as
  ``(num_heads, key_dim + key_dim + value_dim)`` and split per head into ``[q, k, v]``. Give ``num_heads``,
  ``key_dim`` and ``value_dim``; the q columns are then ``h * (2 kd + vd) + [0, kd)`` for every head ``h``, and
  so on. ``B_q`` maps to ``num_heads * key_dim`` outputs in head-major order, scattered into those columns.

:func:`attach_lora` puts it at the ``qkv`` insertion point of an encoder's attention blocks.

The frozen base layer is kept as the submodule ``base`` (so its weight is ``<prefix>.qkv.base.weight``); the
trainable tensors are ``<prefix>.qkv.lora_A.<t>.weight``, ``<prefix>.qkv.lora_B.<t>.weight`` and, with a gate,
``<prefix>.qkv.lora_gate.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.peft.columns import add_low_rank

TARGETS: tuple[str, ...] = ("q", "k", "v")


class LoRAQKV(nn.Module):
    """LoRA around a frozen fused qkv ``nn.Linear``.

    Args:
        base: the fused projection ``Linear(C -> n_out)``. Its parameters are frozen (``requires_grad=False``)
            and kept unchanged as ``self.base``.
        rank: LoRA rank ``r`` (>= 1).
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``. ``None`` means ``alpha = rank``
            (scale 1). Ignored when ``gate=True``.
        dropout: dropout probability on the LoRA branch input (the base path never sees dropout).
        targets: non-empty subset of ``("q", "k", "v")``.
        gate: use the I-MedSAM reference gate ``g = w_g . mean_tokens(x)`` instead of ``alpha / rank``.
        num_heads, key_dim, value_dim: give all three for the per-head interleaved layout (TinyViT); leave all
            ``None`` for the contiguous ``[q | k | v]`` layout (SAM ViT).

    Shapes: ``x`` is ``(B, ..., C)`` (any number of token axes, e.g. ``(B, H, W, C)`` or ``(B, N, C)``);
    the output is ``(B, ..., n_out)``, exactly ``base(x)`` while every ``B_t`` is zero.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: Sequence[str] = ("q", "v"),
        gate: bool = False,
        num_heads: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ImedsamError(f"LoRAQKV wraps an nn.Linear, got {type(base).__name__}")
        if int(rank) < 1:
            raise ImedsamError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ImedsamError(f"LoRA dropout must be in [0, 1), got {dropout}")
        targets = tuple(dict.fromkeys(targets))  # de-duplicate, keep order
        if not targets or any(t not in TARGETS for t in targets):
            raise ImedsamError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {targets}")

        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.targets = targets
        self.gated = bool(gate)
        self.in_features = base.in_features
        self.out_features = base.out_features

        columns = _target_columns(base.out_features, num_heads, key_dim, value_dim)
        self.layout = "contiguous" if num_heads is None else "interleaved"
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for t in targets:
            cols = columns[t]
            self.lora_A[t] = nn.Linear(self.in_features, self.rank, bias=False, **factory)
            self.lora_B[t] = nn.Linear(self.rank, cols.numel(), bias=False, **factory)
            nn.init.kaiming_uniform_(self.lora_A[t].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[t].weight)
            self.register_buffer(f"_cols_{t}", cols.to(base.weight.device), persistent=False)
        self.lora_gate = nn.Linear(self.in_features, 1, bias=False, **factory) if self.gated else None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``(n_out, C)`` (read-only convenience for code that inspects ``qkv.weight``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias ``(n_out,)`` or ``None``."""
        return self.base.bias

    def columns(self, target: str) -> torch.Tensor:
        """Output column indices (int64, ascending in head-major order) owned by ``target`` in ``"q","k","v"``."""
        if target not in self.targets:
            raise ImedsamError(f"{target!r} is not a LoRA target of this layer (targets: {self.targets})")
        return getattr(self, f"_cols_{target}")

    def gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """The reference gate ``g = w_g . mean_tokens(x)``, shape ``(B, 1, ..., 1)`` broadcastable to ``x``.

        The mean is over all axes except the first and the last, as ``x`` arrives (per window for windowed
        attention, padding tokens included).
        """
        if self.lora_gate is None:
            raise ImedsamError("this LoRAQKV layer was built without gate=True")
        if x.ndim > 2:
            pooled = x.mean(dim=tuple(range(1, x.ndim - 1)), keepdim=True)
        else:
            pooled = x
        return self.lora_gate(pooled)

    @property
    def pointwise(self) -> bool:
        """Whether every token is mapped on its own (ungated): then padding tokens can be projected apart."""
        return not self.gated

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` ``(n_out, C)`` such that ``forward(x) == base(x) + x @ dW.T`` (ungated only)."""
        if self.gated:
            raise ImedsamError("a gated LoRA update depends on the input; it has no fixed delta weight")
        dw = torch.zeros_like(self.base.weight)
        for t in self.targets:
            dw = dw.index_add(0, self.columns(t), self.lora_B[t].weight @ self.lora_A[t].weight * self.scaling)
        return dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.lora_dropout(x)
        scale: torch.Tensor | float = self.gate_value(x) if self.gated else self.scaling
        # one GEMM accumulated into the base output (the base Linear does not save it for backward)
        codes = [self.lora_A[t](h) for t in self.targets]
        ups = [self.lora_B[t].weight for t in self.targets]
        if self.gated:  # per image: scales the codes
            codes = [c * scale for c in codes]
        else:
            ups = [u * scale for u in ups]
        return add_low_rank(out, codes, ups, [self.columns(t) for t in self.targets])

    def extra_repr(self) -> str:
        s = "gate" if self.gated else f"alpha/rank={self.scaling:g}"
        return f"rank={self.rank}, targets={''.join(self.targets)}, {s}, layout={self.layout}"


def _target_columns(
    n_out: int, num_heads: int | None, key_dim: int | None, value_dim: int | None
) -> dict[str, torch.Tensor]:
    """Column indices of q, k and v in the fused output for either layout (see the module docstring): for each
    target the same range inside each of ``num_heads`` equal blocks (one block when contiguous), head-major."""
    given = [v is not None for v in (num_heads, key_dim, value_dim)]
    if not any(given):
        if n_out % 3:
            raise ImedsamError(
                f"contiguous [q|k|v] layout needs out_features divisible by 3, got {n_out}; "
                "give num_heads, key_dim and value_dim for an interleaved layout"
            )
        d = n_out // 3
        return {t: torch.arange(i * d, (i + 1) * d, device="cpu") for i, t in enumerate(TARGETS)}
    if not all(given):
        raise ImedsamError("interleaved qkv layout needs all of num_heads, key_dim and value_dim")
    nh, kd, vd = int(num_heads), int(key_dim), int(value_dim)  # type: ignore[arg-type]
    per_head = 2 * kd + vd
    if nh < 1 or kd < 1 or vd < 1 or nh * per_head != n_out:
        raise ImedsamError(
            f"interleaved qkv layout: num_heads*(2*key_dim+value_dim) = {nh}*(2*{kd}+{vd}) "
            f"!= out_features {n_out}"
        )
    start = torch.arange(nh, device="cpu").unsqueeze(1) * per_head
    return {
        "q": (start + torch.arange(kd, device="cpu")).reshape(-1),
        "k": (start + kd + torch.arange(kd, device="cpu")).reshape(-1),
        "v": (start + 2 * kd + torch.arange(vd, device="cpu")).reshape(-1),
    }


def attach_lora(
    encoder: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q", "v"),
    gate: bool = False,
    blocks: Sequence[int] | None = None,
) -> list[int]:
    """Replace ``attn.qkv`` of the selected attention blocks by :class:`LoRAQKV` (the ``qkv`` insertion point).

    ``blocks``: indices into :func:`imedsam.peft.backbone.attention_blocks` (``None`` = all). The column layout
    follows the encoder (contiguous for the ViT, per-head interleaved for TinyViT). Returns the wrapped indices.
    """
    from imedsam.peft.backbone import attention_blocks

    all_blocks = attention_blocks(encoder)
    selected = list(range(len(all_blocks))) if blocks is None else list(blocks)
    bad = [i for i in selected if not 0 <= i < len(all_blocks)]
    if bad:
        raise ImedsamError(f"lora_blocks {bad} out of range: the encoder has {len(all_blocks)} attention blocks "
                           f"(0..{len(all_blocks) - 1})")
    for i in selected:
        attn = all_blocks[i].attn
        heads = {}
        if hasattr(attn, "key_dim"):  # TinyViT: per-head interleaved [q, k, v]
            heads = {"num_heads": attn.num_heads, "key_dim": attn.key_dim, "value_dim": attn.d}
        attn.qkv = LoRAQKV(attn.qkv, rank=rank, alpha=alpha, dropout=dropout, targets=targets, gate=gate, **heads)
    return selected
