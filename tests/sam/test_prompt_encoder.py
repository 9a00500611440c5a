"""Tests of imedsam.sam.prompt_encoder: shapes, SAM conventions, errors, parity with segment-anything."""

from __future__ import annotations

import math

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.sam.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from tests.reference import lite_medsam_checkpoint, official_segment_anything_modeling

EMBED, GRID, INPUT, MASK_CH = 32, (6, 8), (24, 32), 8  # small, non-square on purpose


def _encoder(seed: int = 0) -> PromptEncoder:
    torch.manual_seed(seed)
    return PromptEncoder(EMBED, GRID, INPUT, MASK_CH).eval()


def _prompts(b: int = 3, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(b, n, 2, generator=g) * torch.tensor([INPUT[1], INPUT[0]])
    labels = torch.randint(0, 2, (b, n), generator=g)
    labels[0, -1] = -1  # a user-supplied padding point
    xy = torch.rand(b, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + 5 + torch.rand(b, 2, generator=g) * 10], dim=1)
    masks = torch.randn(b, 1, 4 * GRID[0], 4 * GRID[1], generator=g)
    return (coords, labels), boxes, masks


@pytest.mark.parametrize(
    ("use_points", "use_boxes", "use_masks", "n_sparse"),
    [(True, False, False, 5), (False, True, False, 2), (True, True, False, 6), (False, False, True, 0),
     (True, False, True, 5), (True, True, True, 6), (False, False, False, 0)],
)
def test_shapes(use_points: bool, use_boxes: bool, use_masks: bool, n_sparse: int) -> None:
    enc = _encoder()
    points, boxes, masks = _prompts(b=3, n=4)
    with torch.no_grad():
        sparse, dense = enc(points if use_points else None, boxes if use_boxes else None, masks if use_masks else None)
    b = 3 if (use_points or use_boxes or use_masks) else 1
    assert sparse.shape == (b, n_sparse, EMBED)
    assert dense.shape == (b, EMBED, *GRID)
    assert enc.get_dense_pe().shape == (1, EMBED, *GRID)
    if not use_masks:
        assert torch.equal(dense, enc.no_mask_embed.weight.reshape(1, EMBED, 1, 1).expand_as(dense))


def test_box_layouts_agree_and_corners_use_their_embeddings() -> None:
    enc = _encoder()
    _, boxes, _ = _prompts()
    with torch.no_grad():
        a, _ = enc(None, boxes, None)
        b, _ = enc(None, boxes[:, None, :], None)
        tl = enc.pe_layer.forward_with_coords(boxes[:, None, :2] + 0.5, INPUT)[:, 0] + enc.point_embeddings[2].weight
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:, 0], tl)


def test_padding_and_labels() -> None:
    enc = _encoder()
    (coords, labels), _, _ = _prompts()
    with torch.no_grad():
        sparse, _ = enc((coords, labels), None, None)
        pe = enc.pe_layer.forward_with_coords(coords + 0.5, INPUT)
    not_a_point = enc.not_a_point_embed.weight[0]
    assert torch.equal(sparse[:, -1], not_a_point.expand(3, -1))  # appended padding has no position
    assert torch.equal(sparse[0, -2], not_a_point)  # user-supplied -1 too
    fg = labels == 1
    torch.testing.assert_close(sparse[:, :-1][fg], pe[fg] + enc.point_embeddings[1].weight)
    bg = labels == 0
    torch.testing.assert_close(sparse[:, :-1][bg], pe[bg] + enc.point_embeddings[0].weight)


def test_dense_pe_is_the_point_encoding_at_cell_centres() -> None:
    enc = _encoder()
    pe = enc.get_dense_pe()[0]
    h, w = GRID
    i, j = 4, 5
    # cell centre (j + 0.5, i + 0.5) of the grid, expressed in input pixels (no +0.5 shift here)
    xy = torch.tensor([[[(j + 0.5) * INPUT[1] / w, (i + 0.5) * INPUT[0] / h]]])
    torch.testing.assert_close(pe[:, i, j], enc.pe_layer.forward_with_coords(xy, INPUT)[0, 0])


def test_position_embedding_analytic() -> None:
    torch.manual_seed(0)
    layer = PositionEmbeddingRandom(4)
    g = layer.positional_encoding_gaussian_matrix
    out = layer.forward_with_coords(torch.tensor([[[16.0, 6.0]]]), (12, 32))  # -> (0.5, 0.5) -> (0, 0)
    torch.testing.assert_close(out[0, 0], torch.cat([torch.zeros(4), torch.ones(4)]))
    out = layer.forward_with_coords(torch.tensor([[[32.0, 0.0]]]), (12, 32))  # -> (1, 0) -> (1, -1)
    ang = 2 * math.pi * (g[0] - g[1])
    torch.testing.assert_close(out[0, 0], torch.cat([ang.sin(), ang.cos()]))


def test_bf16_autocast_keeps_float32_positions() -> None:
    enc = _encoder()
    points, boxes, _ = _prompts()
    with torch.no_grad():
        ref, _ = enc(points, boxes, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = enc(points, boxes, None)
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"points": (torch.zeros(2, 3, 2), torch.full((2, 3), 2))}, "labels"),
        ({"points": (torch.zeros(2, 3), torch.ones(2, 3))}, "coords"),
        ({"points": (torch.zeros(2, 3, 2), torch.ones(2, 4))}, "labels"),
        ({"boxes": torch.zeros(2, 2, 4)}, "boxes"),
        ({"masks": torch.zeros(2, 1, 8, 8)}, "masks"),
        ({"points": (torch.zeros(2, 3, 2), torch.ones(2, 3)), "boxes": torch.zeros(3, 4)}, "batch"),
    ],
)
def test_user_errors(kwargs: dict, needle: str) -> None:
    enc = _encoder()
    args = {"points": None, "boxes": None, "masks": None, **kwargs}
    with pytest.raises(ImedsamError, match=needle):
        enc(**args)


def _official_parity(ours: PromptEncoder, official: torch.nn.Module, grid, input_size, b: int = 2) -> None:
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(b, 3, 2, generator=g) * torch.tensor([input_size[1], input_size[0]])
    labels = torch.tensor([[1, 0, -1], [0, 1, 1]])[:b]
    xy = torch.rand(b, 2, generator=g) * input_size[1] / 2
    boxes = torch.cat([xy, xy + input_size[1] / 4], dim=1)
    masks = torch.randn(b, 1, 4 * grid[0], 4 * grid[1], generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours.get_dense_pe(), official.get_dense_pe(), rtol=0, atol=1e-5)
        for p, bx, m in [((coords, labels), None, None), (None, boxes, None), (None, boxes[:, None], masks),
                         ((coords, labels), boxes, None), ((coords, labels), None, masks), (None, None, None)]:
            s1, d1 = ours(p, bx, m)
            s2, d2 = official(p, bx, m)
            torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
            torch.testing.assert_close(d1, d2, rtol=0, atol=1e-5)


def test_parity_with_official_small() -> None:
    modeling = official_segment_anything_modeling()
    torch.manual_seed(5)
    official = modeling.PromptEncoder(EMBED, GRID, INPUT, MASK_CH).eval()
    ours = _encoder(seed=9)
    assert set(ours.state_dict()) == set(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    _official_parity(ours, official, GRID, INPUT)


def test_lite_medsam_prompt_encoder_loads_strictly() -> None:
    modeling = official_segment_anything_modeling()
    sd = torch.load(lite_medsam_checkpoint(), weights_only=True, map_location="cpu")
    sub = {k[len("prompt_encoder."):]: v for k, v in sd.items() if k.startswith("prompt_encoder.")}
    assert sub, "no prompt_encoder.* keys in the LiteMedSAM checkpoint"
    cfg = dict(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)
    ours = PromptEncoder(**cfg).eval()
    ours.load_state_dict(sub, strict=True)
    official = modeling.PromptEncoder(**cfg).eval()
    official.load_state_dict(sub, strict=True)
    _official_parity(ours, official, (64, 64), (256, 256))
