"""Tests of the SAM ViT image encoder: shapes, checkpoint resizing, step-by-step reproducibility, official parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imedsam.errors import ImedsamError
from imedsam.sam.vit import (
    VIT_CONFIGS,
    Attention,
    ImageEncoderViT,
    adapt_vit_state_dict,
    build_image_encoder_vit,
    decomposed_rel_pos_bias,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from tests.reference import official_segment_anything_modeling

TINY = VIT_CONFIGS["vit_tiny"]  # embed 32, depth 4, 2 heads, window 4, global blocks (1, 3)


def _random_state_dict(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random values for every tensor (the default init has zero pos_embed / rel-pos tables, too weak a test)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in model.state_dict().items()}


def _official_resize(sd: dict[str, torch.Tensor], grid: int, global_idx: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Independent re-statement of the SAM-Med2D / I-MedSAM builders' resizing (2-D bilinear on both tensors)."""
    out = dict(sd)
    pe = sd["pos_embed"].permute(0, 3, 1, 2)
    out["pos_embed"] = F.interpolate(pe, (grid, grid), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    for i in global_idx:
        for axis in "hw":
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            t = sd[key][None, None]
            out[key] = F.interpolate(t, (2 * grid - 1, t.shape[-1]), mode="bilinear", align_corners=False)[0, 0]
    return out


@pytest.mark.parametrize("img_size", [64, 96, 128, 160])
def test_output_shape(img_size: int) -> None:
    model = build_image_encoder_vit("vit_tiny", img_size=img_size).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, img_size, img_size))
    assert y.shape == (2, 256, img_size // 16, img_size // 16)
    assert model.pos_embed is not None and model.pos_embed.shape == (1, img_size // 16, img_size // 16, 32)


def test_real_configs_have_official_layout() -> None:
    assert VIT_CONFIGS["vit_b"]["global_attn_indexes"] == (2, 5, 8, 11)
    assert VIT_CONFIGS["vit_l"]["global_attn_indexes"] == (5, 11, 17, 23)
    assert VIT_CONFIGS["vit_h"]["global_attn_indexes"] == (7, 15, 23, 31)
    for name, dim, depth in (("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)):
        cfg = VIT_CONFIGS[name]
        assert (cfg["embed_dim"], cfg["depth"], cfg["window_size"], cfg["out_chans"]) == (dim, depth, 14, 256)
        assert cfg["use_rel_pos"] and cfg["qkv_bias"]
        assert cfg["norm_layer"](8).eps == 1e-6


def test_official_key_names_and_shapes() -> None:
    keys = build_image_encoder_vit("vit_tiny", img_size=96).state_dict()
    assert keys["patch_embed.proj.weight"].shape == (32, 3, 16, 16)
    assert keys["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert keys["blocks.0.attn.rel_pos_h"].shape == (7, 16)  # windowed: 2 * 4 - 1
    assert keys["blocks.1.attn.rel_pos_w"].shape == (11, 16)  # global: 2 * 6 - 1
    assert {"blocks.3.mlp.lin1.weight", "blocks.3.mlp.lin2.bias", "neck.0.weight", "neck.3.bias"} <= set(keys)


def test_forward_is_embed_blocks_neck_and_block_is_reproducible_step_by_step() -> None:
    model = build_image_encoder_vit("vit_tiny", img_size=96).eval()
    model.load_state_dict(_random_state_dict(model))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        tokens = model.embed(x)
        for block in model.blocks:
            # What an adapter wrapper does: re-run the block's flow from its public attributes.
            h = tokens + block.attention(block.norm1(tokens))
            manual = h + block.mlp(block.norm2(h))
            tokens = block(tokens)
            torch.testing.assert_close(manual, tokens, rtol=0, atol=0)
        manual_out = model.neck(tokens.permute(0, 3, 1, 2))
        torch.testing.assert_close(manual_out, model(x), rtol=0, atol=0)


def test_windowed_attention_projects_only_real_tokens_yet_equals_zero_padding() -> None:
    model = build_image_encoder_vit("vit_tiny", img_size=96).eval()  # 6x6 tokens, windows of 4: padded to 8x8
    model.load_state_dict(_random_state_dict(model))
    block = next(b for b in model.blocks if b.window_size > 0)
    assert block.attn.pointwise_qkv and 6 % block.window_size
    x = block.norm1(torch.randn(2, 6, 6, block.attn.qkv.in_features))
    calls = []
    hook = block.attn.qkv.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[:-1].numel()))
    with torch.no_grad():
        fast = block.attention(x)
        windows, pad_hw = window_partition(x, block.window_size)  # SAM: zero tokens through qkv and proj
        padded = window_unpartition(block.attn(windows), block.window_size, pad_hw, (6, 6))
    hook.remove()
    assert calls[:2] == [2 * 36, 1]  # the real tokens, then one zero token for the padding; SAM projects 2 * 64
    torch.testing.assert_close(fast, padded, rtol=0, atol=1e-5)


def test_window_partition_roundtrip_with_padding() -> None:
    x = torch.randn(2, 6, 5, 3)
    windows, pad_hw = window_partition(x, 4)
    assert pad_hw == (8, 8) and windows.shape == (2 * 4, 4, 4, 3)
    assert torch.equal(windows[0], x[0, :4, :4])
    assert torch.count_nonzero(windows[3, 2:, :]) == 0  # bottom-right window of image 0 is mostly padding
    assert torch.equal(window_unpartition(windows, 4, pad_hw, (6, 5)), x)
    fill = torch.tensor([1.0, 2.0, 3.0])
    filled, _ = window_partition(x, 4, fill=fill)
    assert torch.equal(filled[3, 2:, :], fill.expand(2, 4, 3)) and torch.equal(filled[0], x[0, :4, :4])


def test_attention_matches_plain_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(3, 5))
    x = torch.randn(2, 3, 5, 16)
    b, h, w, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    ih, iw = torch.arange(h), torch.arange(w)
    r_h = attn.rel_pos_h[ih[:, None] - ih[None, :] + h - 1]  # (h, h, 8)
    r_w = attn.rel_pos_w[iw[:, None] - iw[None, :] + w - 1]  # (w, w, 8)
    qg = q.reshape(b, 2, h, w, 8)
    bias = torch.einsum("bnhwc,hkc->bnhwk", qg, r_h)[..., None] + torch.einsum("bnhwc,wkc->bnhwk", qg, r_w)[
        ..., None, :
    ]
    probs = (logits + bias.reshape(b, 2, h * w, h * w)).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(b, h, w, c))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rel_pos_bias_gemm_is_the_broadcast_sum_exactly(dtype: torch.dtype) -> None:
    """The 0/1 expansion GEMM adds exactly the two terms (bit-identical to the 6-D broadcast add, bf16 too)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4 * 6, 8, generator=g).to(dtype)
    rel_h, rel_w = torch.randn(7, 8, generator=g).to(dtype), torch.randn(11, 8, generator=g).to(dtype)
    r_q = q.reshape(2, 3, 4, 6, 8)
    bias_h = torch.einsum("...hwc,hkc->...hwk", r_q, get_rel_pos(4, 4, rel_h).to(dtype))
    bias_w = torch.einsum("...hwc,wkc->...hwk", r_q, get_rel_pos(6, 6, rel_w).to(dtype))
    expected = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(2, 3, 24, 24)
    assert torch.equal(decomposed_rel_pos_bias(q, rel_h, rel_w, (4, 6), (4, 6)), expected)


def test_adapt_state_dict_1024_to_256_loads_strictly() -> None:
    big = build_image_encoder_vit("vit_tiny", img_size=1024)
    sd = {f"image_encoder.{k}": v for k, v in _random_state_dict(big).items()}
    sd["mask_decoder.foo"] = torch.zeros(1)  # unrelated keys pass through untouched
    small = build_image_encoder_vit("vit_tiny", img_size=256)
    adapted = adapt_vit_state_dict(sd, small, prefix="image_encoder.")

    assert sd["image_encoder.pos_embed"].shape == (1, 64, 64, 32)  # input not modified
    assert adapted["image_encoder.pos_embed"].shape == (1, 16, 16, 32)
    for i in (1, 3):  # global: 2 * 64 - 1 -> 2 * 16 - 1
        assert sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == (127, 16)
        assert adapted[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == (31, 16)
        assert adapted[f"image_encoder.blocks.{i}.attn.rel_pos_w"].shape == (31, 16)
    for i in (0, 2):  # windowed: unchanged, same tensor
        key = f"image_encoder.blocks.{i}.attn.rel_pos_h"
        assert adapted[key] is sd[key] and adapted[key].shape == (7, 16)
    assert adapted["mask_decoder.foo"] is sd["mask_decoder.foo"]

    encoder_sd = {k.removeprefix("image_encoder."): v for k, v in adapted.items() if k.startswith("image_encoder.")}
    small.load_state_dict(encoder_sd, strict=True)


def test_adapt_same_size_is_identity_and_keeps_dtype() -> None:
    model = build_image_encoder_vit("vit_tiny", img_size=64)
    sd = {k: v.half() for k, v in _random_state_dict(model).items()}
    same = adapt_vit_state_dict(sd, model)
    assert all(same[k] is sd[k] for k in sd)
    resized = adapt_vit_state_dict(sd, build_image_encoder_vit("vit_tiny", img_size=128))
    assert resized["pos_embed"].dtype == torch.float16 and resized["pos_embed"].shape == (1, 8, 8, 32)


def test_adapt_rejects_other_window_size_and_other_variant() -> None:
    sd = build_image_encoder_vit("vit_tiny", img_size=64).state_dict()
    with pytest.raises(ImedsamError, match="window_size"):
        adapt_vit_state_dict(sd, build_image_encoder_vit("vit_tiny", img_size=64, window_size=2))
    with pytest.raises(ImedsamError, match="another ViT variant"):
        adapt_vit_state_dict(sd, build_image_encoder_vit("vit_tiny", img_size=64, embed_dim=64))


def test_user_errors() -> None:
    model = build_image_encoder_vit("vit_tiny", img_size=64)
    with pytest.raises(ImedsamError, match="img_size=64"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ImedsamError, match="expected"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ImedsamError, match="multiple of patch_size"):
        ImageEncoderViT(img_size=100, **TINY)
    with pytest.raises(ImedsamError, match="unknown ViT encoder"):
        build_image_encoder_vit("vit_x")
    with pytest.raises(ImedsamError, match="global_attn_indexes"):
        build_image_encoder_vit("vit_tiny", global_attn_indexes=(4,))


# ---------------------------------------------------------------------------------------------------- parity


def _official_encoder(img_size: int) -> torch.nn.Module:
    modeling = official_segment_anything_modeling()
    return modeling.ImageEncoderViT(img_size=img_size, **TINY).eval()


def test_parity_with_official_at_checkpoint_size() -> None:
    official = _official_encoder(96)  # 6x6 tokens: windows of 4 need padding to 8x8
    sd = _random_state_dict(official)
    official.load_state_dict(sd, strict=True)
    ours = ImageEncoderViT(img_size=96, **TINY).eval()
    ours.load_state_dict(sd, strict=True)

    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    y_ref, y = official(x), ours(x)
    assert (y - y_ref).abs().max().item() <= 1e-4
    # Gradients through the SDPA path (rel-pos bias passed as a mask) match too.
    y_ref.square().mean().backward()
    y.square().mean().backward()
    grads = dict(ours.named_parameters())
    for name, p in official.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_parity_with_official_after_resizing() -> None:
    official_96 = _official_encoder(96)
    sd = _random_state_dict(official_96, seed=2)
    official_160 = _official_encoder(160)  # 10x10 tokens, windows padded to 12x12
    official_160.load_state_dict(_official_resize(sd, 10, TINY["global_attn_indexes"]), strict=True)

    ours = ImageEncoderViT(img_size=160, **TINY).eval()
    ours.load_state_dict(adapt_vit_state_dict(sd, ours), strict=True)

    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - official_160(x)).abs().max().item() <= 1e-4
