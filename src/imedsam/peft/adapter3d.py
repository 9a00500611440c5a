"""MA-SAM's 3-D adapter: mixes the tokens of D adjacent slices, before and after every block's attention
(systems.md §C.3).

The encoder sees B stacks of D adjacent slices as ``N = B * D`` images, slice index inner
(:mod:`imedsam.sam.insertion`; ``ctx.num_slices = D``). For the tokens ``x`` at the ``pre_attn`` or
``post_attn`` slot::

    z = down(LN(x))                                  LN(C, eps 1e-6); down: Linear(C -> d, no bias)
    z -> (B, d, D, h, w) -> Conv3d(d -> d, kernel k, 'same' zero padding, bias) -> (B * D, h, w, d)
    out = up(GELU(z))                                up: Linear(d -> C, no bias)

and the block adds ``out`` (the residual). The default kernel ``(3, 1, 1)`` mixes only across slices, each token
with the same token of its neighbours (the stack's ends see zero padding), as MA-SAM's code; ``(3, 3, 3)`` also
mixes neighbouring tokens. MA-SAM's width ``d`` is 384 for every backbone and ``up`` is not zero-initialised
(the adapters change SAM's features from step 0); ``zero_init_up`` starts them at exactly 0.

Key names inside the slots: ``pre_attn.adapter3d.{norm, down, conv, up}`` and ``post_attn.adapter3d.*``, for
MA-SAM's ``Block.adapter_{norm, linear_down, conv, linear_up}`` and the ``_2`` set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["Adapter3D", "attach_adapter3d", "SLOT_KEY"]

SLOT_KEY = "adapter3d"


class Adapter3D(nn.Module):
    """One 3-D adapter (module docstring), a ``pre_attn``/``post_attn`` slot adapter.

    Args:
        dim: token width C.
        hidden: bottleneck width d (MA-SAM: 384).
        kernel: Conv3d kernel over (slices, rows, columns); odd sizes.
        zero_init_up: start ``up`` at zero (the adapter adds 0 at initialisation).
        grid: ``(h, w)`` of flat tokens ``(N, h*w, C)`` (TinyViT), needed only by kernels wider than 1 in-plane.

    Shapes: ``(B*D, h, w, C)`` or ``(B*D, h*w, C)`` -> the same; D from the forward's context.
    """

    def __init__(self, dim: int, hidden: int = 384, kernel: Sequence[int] = (3, 1, 1), *, zero_init_up: bool = False,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        kernel = tuple(int(k) for k in kernel)
        if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
            raise ImedsamError(f"adapter3d kernel {kernel}: give 3 odd sizes (slices, rows, columns), e.g. [3, 1, 1]")
        if int(dim) < 1 or int(hidden) < 1:
            raise ImedsamError(f"Adapter3D needs dim >= 1 and hidden >= 1, got {dim}, {hidden}")
        self.dim, self.hidden, self.kernel = int(dim), int(hidden), kernel
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.down = nn.Linear(self.dim, self.hidden, bias=False)
        self.conv = nn.Conv3d(self.hidden, self.hidden, kernel, padding="same")
        self.act = nn.GELU()
        self.up = nn.Linear(self.hidden, self.dim, bias=False)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        d = 1 if ctx is None else int(ctx.num_slices)
        n = x.shape[0]
        if n % d:
            raise ImedsamError(f"Adapter3D: {n} images are not whole stacks of {d} slices")
        z = self.down(self.norm(x))
        spatial = z.shape[1:-1]
        if len(spatial) == 1:  # flat TinyViT tokens
            if self.kernel[1:] != (1, 1):
                if self.grid is None or self.grid[0] * self.grid[1] != spatial[0]:
                    raise ImedsamError(f"Adapter3D: in-plane kernel {self.kernel[1:]} needs the token grid, got "
                                       f"{self.grid} for {spatial[0]} tokens")
                spatial = self.grid
            else:
                spatial = (spatial[0], 1)
        vol = z.reshape(n // d, d, *spatial, self.hidden).permute(0, 4, 1, 2, 3)  # (B, d, D, h, w)
        vol = self.conv(vol.contiguous())
        z = vol.permute(0, 2, 3, 4, 1).reshape(z.shape)
        return self.up(self.act(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, kernel={self.kernel}"


def attach_adapter3d(encoder: nn.Module, *, hidden: int = 384, kernel: Sequence[int] = (3, 1, 1),
                     zero_init_up: bool = False, positions: Sequence[str] = ("pre_attn", "post_attn"),
                     blocks: Sequence[int] | None = None) -> list[int]:
    """Put an :class:`Adapter3D` in the given slots (``pre_attn``, ``post_attn``) of the selected attention
    blocks (MA-SAM: both, every block); returns the block indices."""
    from imedsam.peft.backbone import attention_blocks, block_grid, block_width

    bad_pos = [p for p in positions if p not in ("pre_attn", "post_attn")]
    if bad_pos or not positions:
        raise ImedsamError(f"adapter3d positions {list(positions)}: choose among pre_attn, post_attn")
    all_blocks = attention_blocks(encoder)
    selected = list(range(len(all_blocks))) if blocks is None else sorted(set(blocks))
    if any(not 0 <= i < len(all_blocks) for i in selected):
        raise ImedsamError(f"adapter3d blocks {selected} out of range: the encoder has {len(all_blocks)} blocks")
    ref = next(encoder.parameters())
    for i in selected:
        block = all_blocks[i]
        grid = block_grid(block, encoder) if hasattr(block, "input_resolution") else None
        for position in positions:
            adapter = Adapter3D(block_width(block), hidden, kernel, zero_init_up=zero_init_up, grid=grid)
            getattr(block, position)[SLOT_KEY] = adapter.to(device=ref.device, dtype=ref.dtype)
    return selected
