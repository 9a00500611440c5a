"""Tests of imedsam.sam.transformer and imedsam.sam.mask_decoder: shapes, batching, parity with segment-anything."""

from __future__ import annotations

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.sam.mask_decoder import MaskDecoder, upscale_channels_last
from imedsam.sam.prompt_encoder import PromptEncoder
from imedsam.sam.transformer import Attention, TwoWayTransformer
from tests.reference import lite_medsam_checkpoint, official_segment_anything_modeling

DIM, HEADS, MLP_DIM, GRID = 64, 4, 128, (6, 8)


def _small_kwargs() -> dict:
    return dict(transformer_dim=DIM, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32)


def _decoder(seed: int = 0) -> MaskDecoder:
    torch.manual_seed(seed)
    transformer = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP_DIM)
    return MaskDecoder(transformer=transformer, **_small_kwargs()).eval()


def _inputs(b: int = 3, n: int = 2, image_batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(image_batch, DIM, *GRID, generator=g)
    pe = torch.randn(1, DIM, *GRID, generator=g)
    sparse = torch.randn(b, n, DIM, generator=g)
    dense = torch.randn(b, DIM, *GRID, generator=g)
    return image, pe, sparse, dense


@pytest.mark.parametrize(("multimask", "k"), [(True, 3), (False, 1)])
@pytest.mark.parametrize("image_batch", [1, 3])
def test_shapes(multimask: bool, k: int, image_batch: int) -> None:
    dec = _decoder()
    with torch.no_grad():
        masks, iou = dec(*_inputs(b=3, image_batch=image_batch), multimask_output=multimask)
    assert masks.shape == (3, k, 4 * GRID[0], 4 * GRID[1])
    assert iou.shape == (3, k)


def test_trunk_methods() -> None:
    dec = _decoder()
    image, pe, sparse, dense = _inputs(b=2, n=5)
    with torch.no_grad():
        tokens, image_tokens = dec.run_transformer(image, pe, sparse, dense)
        up = dec.upscale(image_tokens)
        masks, _ = dec.predict_masks(image, pe, sparse, dense)
    assert tokens.shape == (2, 1 + 4 + 5, DIM)
    assert image_tokens.shape == (2, DIM, *GRID)
    assert up.shape == (2, DIM // 8, 4 * GRID[0], 4 * GRID[1])
    manual = torch.einsum("bc,bchw->bhw", dec.output_hypernetworks_mlps[2](tokens[:, 3]), up)
    torch.testing.assert_close(masks[:, 2], manual, rtol=1e-5, atol=1e-5)


def test_batched_images_equal_one_image_at_a_time() -> None:
    dec = _decoder()
    image, pe, sparse, dense = _inputs(b=3, image_batch=3)
    with torch.no_grad():
        masks, iou = dec(image, pe, sparse, dense, multimask_output=True)
        for i in range(3):
            m_i, iou_i = dec(image[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], multimask_output=True)
            torch.testing.assert_close(masks[i : i + 1], m_i, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[i : i + 1], iou_i, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_upscaling_head() -> None:
    dec = _decoder()
    _, image_tokens = dec.run_transformer(*_inputs(b=2))
    dec.upscale(image_tokens).sum().backward()
    assert dec.output_upscaling[0].weight.grad is not None
    assert dec.transformer.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("widths", [(DIM // 4, DIM // 8), (16, 8, 4, 2)])  # SAM's 4x head, MA-SAM's 16x head
def test_channels_last_upscaling_is_the_sequential(widths: tuple[int, ...]) -> None:
    """The up-scaling head computed as matrix products on channels-last tokens gives the ConvTranspose2d /
    LayerNorm2d / GELU Sequential's values and gradients, from an NCHW or a channels-last input."""
    torch.manual_seed(3)
    dec = MaskDecoder(transformer=TwoWayTransformer(depth=1, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP_DIM),
                      upscale_channels=widths, **_small_kwargs())
    with torch.no_grad():  # non-trivial LayerNorm2d affine terms (they start at 1 and 0)
        for p in dec.output_upscaling.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, DIM, 5, 7)
    for given in (x, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        a = given.clone().requires_grad_(True)
        b = given.clone().requires_grad_(True)
        plain = dec.output_upscaling(a)
        fast = upscale_channels_last(dec.output_upscaling, b)
        assert fast.shape == plain.shape == (2, widths[-1], 5 * 2 ** len(widths), 7 * 2 ** len(widths))
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        weight = torch.randn_like(plain)
        grads_plain = torch.autograd.grad((plain * weight).sum(), [a, *dec.output_upscaling.parameters()])
        grads_fast = torch.autograd.grad((fast * weight).sum(), [b, *dec.output_upscaling.parameters()])
        for g_plain, g_fast in zip(grads_plain, grads_fast):
            torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-4)
    assert dec.upscale(x).stride()[1] == 1  # channels-last, as documented
    with torch.no_grad():  # the last doubling's 2x2 blocks left in place: pixel (2i + a, 2j + b) at [:, i, j, a, b]
        blocks = upscale_channels_last(dec.output_upscaling, x, interleave_last=False)
        plain = dec.output_upscaling(x)
    hh, ww = plain.shape[-2] // 2, plain.shape[-1] // 2
    assert blocks.shape == (2, hh, ww, 2, 2, widths[-1])
    for a in (0, 1):
        for b in (0, 1):
            torch.testing.assert_close(blocks[:, :, :, a, b].permute(0, 3, 1, 2), plain[:, :, a::2, b::2],
                                       rtol=1e-5, atol=1e-5)


def test_other_upscaling_layers_run_as_the_sequential() -> None:
    layers = torch.nn.Sequential(torch.nn.ConvTranspose2d(DIM, 8, kernel_size=3, stride=2), torch.nn.GELU())
    x = torch.randn(1, DIM, 4, 4)
    torch.testing.assert_close(upscale_channels_last(layers, x), layers(x))
    activation_only = torch.nn.Sequential(torch.nn.GELU())  # no up-scaling layer at all: the activation alone
    torch.testing.assert_close(upscale_channels_last(activation_only, x, interleave_last=False), activation_only(x))


@pytest.mark.parametrize(
    ("image_batch", "dense_shape", "needle"),
    [(2, None, "image_embeddings"), (1, (3, DIM, 5, 5), "dense_prompt_embeddings")],
)
def test_user_errors(image_batch: int, dense_shape, needle: str) -> None:
    dec = _decoder()
    image, pe, sparse, dense = _inputs(b=3, image_batch=image_batch)
    if dense_shape is not None:
        dense = torch.zeros(dense_shape)
    with pytest.raises(ImedsamError, match=needle):
        dec(image, pe, sparse, dense, multimask_output=False)


def test_attention_config_errors() -> None:
    with pytest.raises(ImedsamError, match="num_heads"):
        Attention(64, 5, downsample_rate=2)


def _official_decoder(modeling, **kwargs) -> torch.nn.Module:
    t = kwargs.pop("transformer_cfg")
    return modeling.MaskDecoder(transformer=modeling.TwoWayTransformer(**t), **kwargs).eval()


def test_parity_with_official_small() -> None:
    modeling = official_segment_anything_modeling()
    torch.manual_seed(7)
    official = _official_decoder(
        modeling, transformer_cfg=dict(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=MLP_DIM), **_small_kwargs()
    )
    with torch.no_grad():  # make LayerNorm affine terms non-trivial so they are really compared
        for name, p in official.named_parameters():
            if "norm" in name or "output_upscaling.1" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = _decoder(seed=11)
    assert set(ours.state_dict()) == set(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    image, pe, sparse, dense = _inputs(b=3, n=3)
    with torch.no_grad():
        for multimask in (True, False):
            m1, i1 = ours(image, pe, sparse, dense, multimask_output=multimask)
            m2, i2 = official(image, pe, sparse, dense, multimask_output=multimask)
            assert (m1 - m2).abs().max() <= 1e-4
            assert (i1 - i2).abs().max() <= 1e-4
        # the transformer alone, also against the official one
        tok = torch.randn(3, 7, DIM)
        q1, k1 = ours.transformer(image.expand(3, -1, -1, -1), pe, tok)
        q2, k2 = official.transformer(image.expand(3, -1, -1, -1), pe.expand(3, -1, -1, -1), tok)
        torch.testing.assert_close(q1, q2, rtol=0, atol=1e-5)
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-5)


LITE_PE = dict(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)
LITE_T = dict(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
LITE_D = dict(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)


def test_lite_medsam_weights_load_strictly_and_match_official() -> None:
    modeling = official_segment_anything_modeling()
    sd = torch.load(lite_medsam_checkpoint(), weights_only=True, map_location="cpu")
    pe_sd = {k[len("prompt_encoder."):]: v for k, v in sd.items() if k.startswith("prompt_encoder.")}
    dec_sd = {k[len("mask_decoder."):]: v for k, v in sd.items() if k.startswith("mask_decoder.")}
    assert pe_sd and dec_sd
    prompt_encoder = PromptEncoder(**LITE_PE).eval()
    prompt_encoder.load_state_dict(pe_sd, strict=True)
    ours = MaskDecoder(transformer=TwoWayTransformer(**LITE_T), **LITE_D).eval()
    ours.load_state_dict(dec_sd, strict=True)
    official = _official_decoder(modeling, transformer_cfg=dict(LITE_T), **LITE_D)
    official.load_state_dict(dec_sd, strict=True)

    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 256, 64, 64, generator=g) * 0.5
    boxes = torch.tensor([[40.0, 60.0, 180.0, 200.0], [10.0, 20.0, 90.0, 100.0]])
    with torch.no_grad():
        sparse, dense = prompt_encoder(None, boxes, None)
        pe = prompt_encoder.get_dense_pe()
        m1, i1 = ours(image, pe, sparse, dense, multimask_output=False)
        m2, i2 = official(image, pe, sparse, dense, multimask_output=False)
    assert m1.shape == (2, 1, 256, 256) and i1.shape == (2, 1)
    assert (m1 - m2).abs().max() <= 1e-4
    assert (i1 - i2).abs().max() <= 1e-4
