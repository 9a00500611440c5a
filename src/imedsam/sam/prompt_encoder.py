"""SAM's prompt encoder: points, boxes and low-resolution masks to sparse and dense embeddings.

State-dict keys and constructor signatures follow segment-anything, so the ``prompt_encoder.*`` tensors of an
official SAM, LiteMedSAM or MobileSAM checkpoint load strictly into :class:`PromptEncoder`.

Conventions
-----------
* Coordinates are ``(x, y)`` pixels in the frame of the **encoder input** (the ``S×S`` image the image encoder
  sees, ``input_image_size`` as ``(H, W)``). As in SAM, a coordinate ``c`` is shifted by ``+0.5`` (pixel centre)
  and divided by the input size, giving ``[0, 1]``; the random-Fourier encoding then maps it to ``2c - 1``.
* Point labels: ``1`` foreground, ``0`` background, ``-1`` padding ("not a point"). Any other label is a user
  error.
* Boxes are ``(x_min, y_min, x_max, y_max)`` in the same pixel frame, one box per prompt.
* When points are given without a box, one padding point is appended to every prompt, exactly as SAM does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.sam.common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding (Tancik et al.), as used by SAM.

    A point ``c ∈ [0, 1]²`` (``(x, y)`` order) is encoded as ``[sin(2π c′G), cos(2π c′G)]`` with
    ``c′ = 2c − 1`` and ``G`` the fixed ``(2, num_pos_feats)`` Gaussian buffer
    ``positional_encoding_gaussian_matrix``; the output has ``2 * num_pos_feats`` channels. The encoding is
    always computed in float32 (the angles reach hundreds of radians, far beyond what bf16/fp16 can resolve)
    and returned in float32.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if num_pos_feats <= 0:
            raise ImedsamError(f"num_pos_feats={num_pos_feats} must be a positive integer")
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``(..., 2)`` coordinates normalised to ``[0, 1]`` into ``(..., 2 * num_pos_feats)`` float32."""
        gaussian = self.positional_encoding_gaussian_matrix.float()
        with torch.autocast(device_type=coords.device.type, enabled=False):
            coords = 2.0 * coords.float() - 1.0
            angles = (2.0 * math.pi) * (coords @ gaussian)
            return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an ``(h, w)`` grid: ``((i + 0.5) / h, (j + 0.5) / w)``.

        Returns:
            ``(2 * num_pos_feats, h, w)`` float32.
        """
        h, w = int(size[0]), int(size[1])
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        pe = self._pe_encoding(torch.stack([grid_x, grid_y], dim=-1))  # (h, w, C)
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode un-normalised ``(x, y)`` coordinates.

        Args:
            coords_input: ``(B, N, 2)`` coordinates in ``(x, y)`` order, in the units of ``image_size``
                (already shifted to pixel centres by the caller, if wanted). Not modified.
            image_size: ``(H, W)``; ``x`` is divided by ``W`` and ``y`` by ``H``.

        Returns:
            ``(B, N, 2 * num_pos_feats)`` float32.
        """
        if coords_input.shape[-1] != 2:
            raise ImedsamError(
                f"coords_input has shape {tuple(coords_input.shape)}; its last axis must hold (x, y) (size 2)"
            )
        scale = coords_input.new_tensor([float(image_size[1]), float(image_size[0])], dtype=torch.float32)
        return self._pe_encoding(coords_input.float() / scale)


class PromptEncoder(nn.Module):
    """Encode point, box and mask prompts for SAM's mask decoder.

    Args:
        embed_dim: channel dimension of the prompt embeddings (256 for SAM).
        image_embedding_size: ``(h, w)`` of the image embedding (64×64 for a 1024 SAM input).
        input_image_size: ``(H, W)`` of the encoder input, the frame of point and box coordinates.
        mask_in_chans: hidden channels of the mask down-scaling convolutions (16 for SAM).
        activation: activation class used in the mask down-scaling path.

    State-dict keys: ``pe_layer.positional_encoding_gaussian_matrix``, ``point_embeddings.{0..3}.weight``
    (background point, foreground point, box top-left, box bottom-right), ``not_a_point_embed.weight``,
    ``mask_downscaling.{0,1,3,4,6}.*`` and ``no_mask_embed.weight``.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or embed_dim % 2:
            raise ImedsamError(f"embed_dim={embed_dim} must be a positive even integer (e.g. 256)")
        if mask_in_chans < 4 or mask_in_chans % 4:
            raise ImedsamError(f"mask_in_chans={mask_in_chans} must be a positive multiple of 4 (e.g. 16)")
        self.embed_dim = embed_dim
        self.image_embedding_size = (int(image_embedding_size[0]), int(image_embedding_size[1]))
        self.input_image_size = (int(input_image_size[0]), int(input_image_size[1]))
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings: int = 4  # background point, foreground point, two box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid (cell centres), ``(1, embed_dim, h, w)`` float32."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    # ------------------------------------------------------------------ embedding of each prompt type

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 2)`` points and ``(B, N)`` labels -> ``(B, N (+1 if pad), embed_dim)``."""
        points = points.float() + 0.5  # centre of the pixel
        labels = labels.to(device=points.device)
        if pad:
            b = points.shape[0]
            points = torch.cat([points, points.new_zeros((b, 1, 2))], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        weight = self.not_a_point_embed.weight
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size).to(weight.dtype)
        lab = labels.unsqueeze(-1)
        # Padding points carry no position: their embedding is exactly not_a_point_embed.
        out = torch.where(lab == -1, weight.expand_as(pe), pe)
        out = out + torch.where(lab == 0, self.point_embeddings[0].weight, 0.0)
        out = out + torch.where(lab == 1, self.point_embeddings[1].weight, 0.0)
        return out

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` or ``(B, 1, 4)`` xyxy boxes -> ``(B, 2, embed_dim)`` corner tokens."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        weight = self.point_embeddings[2].weight
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(weight.dtype)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return pe + corner_embed

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 4h, 4w)`` mask logits -> ``(B, embed_dim, h, w)``."""
        return self.mask_downscaling(masks.to(self.no_mask_embed.weight.dtype))

    # ------------------------------------------------------------------ validation

    def _check_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        """Validate shapes and labels; return the prompt batch size ``B`` (1 when no prompt is given)."""
        sizes: list[tuple[str, int]] = []
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ImedsamError("points must be a pair (coords (B, N, 2), labels (B, N)) or None")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ImedsamError(
                    f"point coords have shape {tuple(coords.shape)}; expected (B, N, 2) in (x, y) order"
                )
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ImedsamError(
                    f"point labels have shape {tuple(labels.shape)}; expected {tuple(coords.shape[:2])} "
                    "(one label per point)"
                )
            if labels.numel() and not bool(((labels == -1) | (labels == 0) | (labels == 1)).all()):
                raise ImedsamError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
            sizes.append(("points", coords.shape[0]))
        if boxes is not None:
            if not ((boxes.ndim == 2 and boxes.shape[-1] == 4) or (boxes.ndim == 3 and boxes.shape[1:] == (1, 4))):
                raise ImedsamError(
                    f"boxes have shape {tuple(boxes.shape)}; expected (B, 4) or (B, 1, 4) xyxy, one box per prompt"
                )
            sizes.append(("boxes", boxes.shape[0]))
        if masks is not None:
            expected = (1, *self.mask_input_size)
            if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
                raise ImedsamError(
                    f"masks have shape {tuple(masks.shape)}; expected (B, {expected[0]}, {expected[1]}, "
                    f"{expected[2]}) (four times the image-embedding size)"
                )
            sizes.append(("masks", masks.shape[0]))
        if len({n for _, n in sizes}) > 1:
            listed = ", ".join(f"{name}={n}" for name, n in sizes)
            raise ImedsamError(f"prompt batch sizes differ ({listed}); give every prompt type the same batch B")
        return sizes[0][1] if sizes else 1

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts of a batch of ``B`` prompts.

        Args:
            points: ``(coords (B, N, 2), labels (B, N))`` or None; ``(x, y)`` pixels of the encoder input,
                labels 1/0/-1 (see the module docstring).
            boxes: ``(B, 4)`` or ``(B, 1, 4)`` xyxy pixels of the encoder input, or None.
            masks: ``(B, 1, 4h, 4w)`` low-resolution mask logits, or None.

        Returns:
            ``sparse``: ``(B, n, embed_dim)`` with ``n = N + 1`` (points, padded) without a box,
            ``N + 2`` with points and a box, ``2`` for a box alone, ``0`` with neither.
            ``dense``: ``(B, embed_dim, h, w)``, the encoded mask or ``no_mask_embed`` broadcast (an expanded
            view in that case; do not write into it).
        """
        bs = self._check_prompts(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
