"""SAM-Med2D's adapter: a channel (squeeze-excitation) branch then a spatial (conv / transposed conv) branch,
beside every block's MLP and sharing its norm (systems.md §B.2).

For the MLP's input ``h`` (``norm2(x)``; TinyViT: ``mlp.norm(x)``) seen as ``z`` (N, C, H, W)::

    a   = sigmoid(W2 . relu(W1 . mean_HW(z)))        channel.0: Linear(C -> C/se_reduction), channel.2: Linear(-> C)
    z_c = a * z                                      (per channel)
    s   = relu(ConvT(relu(Conv(z_c))))               spatial.0: Conv2d(C -> d, 3, stride 2, pad 1)
                                                     spatial.2: ConvTranspose2d(d -> C, 4, stride 2, pad 1)
    out = LN(z + s)                                  norm: LayerNorm(C), over channels

and the block adds ``out`` beside the MLP: ``x = x + mlp(h) + out``. No bias anywhere but the LayerNorm; weights
Kaiming-normal (fan_out, ReLU) as the official code. The spatial branch halves the grid and restores it (an odd
side comes back one longer and is cropped).

* ``reference`` (the official adapter): ``d = C`` and ``se_reduction = 4``, 15,042,048 parameters per ViT-B
  block (180.5 M in all, systems.md §F.22), and the LayerNorm starts at weight 1, bias 0, so about ``LN(h)`` is
  added to every block from step 0: the adapted encoder is not the pretrained one at initialisation.
* ``paper`` (ours, the default): a bottleneck ``d`` (16) and ``se_reduction`` 16 (ViT-B: 382,464 per block,
  4.6 M in all), and ``zero_init``: the LayerNorm's weight and bias start at 0, so the adapter adds exactly 0 at
  initialisation (gradients reach the LayerNorm first, then the branches, as LoRA's zero ``B``).

Key names follow the official checkpoints inside the slot: ``blocks.N.mlp_parallel.med2d.{norm, channel.0,
channel.2, spatial.0, spatial.2}`` for the official ``blocks.N.Adapter.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imedsam.errors import ImedsamError

__all__ = ["Med2DAdapter", "attach_med2d", "SLOT_KEY"]

SLOT_KEY = "med2d"  # name of the adapter in each block's mlp_parallel slot


class Med2DAdapter(nn.Module):
    """One block's SAM-Med2D adapter (module docstring), a ``mlp_parallel`` slot adapter.

    Args:
        dim: token width C.
        adapter_dim: width d of the spatial bottleneck (C in the official adapter).
        se_reduction: the channel branch's hidden width is ``C // se_reduction`` (4 in the official adapter).
        zero_init: start the LayerNorm at weight 0 and bias 0 (the adapter adds exactly 0 at initialisation).
        grid: ``(H, W)`` of the tokens when they arrive flat ``(N, H*W, C)`` (TinyViT); ``None`` for ``(N, H, W, C)``.

    Shapes: ``(N, H, W, C)`` or ``(N, H*W, C)`` -> the same.
    """

    def __init__(self, dim: int, adapter_dim: int, se_reduction: int = 4, *, zero_init: bool = False,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if min(int(dim), int(adapter_dim), int(se_reduction)) < 1 or int(se_reduction) > int(dim):
            raise ImedsamError(f"Med2DAdapter: need dim >= 1, adapter_dim >= 1 and 1 <= se_reduction <= dim, got "
                               f"dim={dim}, adapter_dim={adapter_dim}, se_reduction={se_reduction}")
        c, d = int(dim), int(adapter_dim)
        self.dim, self.adapter_dim, self.se_reduction = c, d, int(se_reduction)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.channel = nn.Sequential(nn.Linear(c, c // self.se_reduction, bias=False), nn.ReLU(),
                                     nn.Linear(c // self.se_reduction, c, bias=False), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(c, d, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                                     nn.ConvTranspose2d(d, c, 4, stride=2, padding=1, bias=False), nn.ReLU())
        self.norm = nn.LayerNorm(c)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def adapt(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, H, W, C)``: the adapter's output, channels-last."""
        a = self.channel(z.mean(dim=(2, 3)))  # (N, C)
        zc = z * a[:, :, None, None].to(z.dtype)
        s = self.spatial(zc)[..., : z.shape[2], : z.shape[3]]
        return self.norm((z + s).permute(0, 2, 3, 1))

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        if h.ndim == 3:
            if self.grid is None or self.grid[0] * self.grid[1] != h.shape[1]:
                raise ImedsamError(f"Med2DAdapter got {h.shape[1]} flat tokens but its grid is {self.grid}")
            n, _, c = h.shape
            out = self.adapt(h.transpose(1, 2).reshape(n, c, *self.grid))
            return out.reshape(n, -1, c)
        return self.adapt(h.permute(0, 3, 1, 2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, adapter_dim={self.adapter_dim}, se_reduction={self.se_reduction}, grid={self.grid}"


def attach_med2d(encoder: nn.Module, *, adapter_dim: int | None, se_reduction: int, zero_init: bool,
                 blocks: Sequence[int] | None = None) -> list[int]:
    """Put a :class:`Med2DAdapter` in the ``mlp_parallel`` slot of the selected attention blocks
    (``adapter_dim=None``: full width, as the official adapter). Returns the block indices."""
    from imedsam.peft.backbone import attention_blocks, block_grid, block_width

    all_blocks = attention_blocks(encoder)
    selected = list(range(len(all_blocks))) if blocks is None else sorted(set(blocks))
    bad = [i for i in selected if not 0 <= i < len(all_blocks)]
    if bad:
        raise ImedsamError(f"peft.blocks {bad} out of range: the encoder has {len(all_blocks)} attention blocks")
    ref = next(encoder.parameters())
    for i in selected:
        block = all_blocks[i]
        c = block_width(block)
        grid = block_grid(block, encoder) if hasattr(block, "input_resolution") else None
        adapter = Med2DAdapter(c, c if adapter_dim is None else adapter_dim, min(se_reduction, c),
                               zero_init=zero_init, grid=grid)
        block.mlp_parallel[SLOT_KEY] = adapter.to(device=ref.device, dtype=ref.dtype)
    return selected
