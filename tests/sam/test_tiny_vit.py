"""TinyViT: shapes, key names, attention maths, and parity with LiteMedSAM's official module on its real weights."""

from __future__ import annotations

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.sam.tiny_vit import Conv2dBN, TinyViT, TinyViTAttention
from tests.reference import single_thread

SMALL = dict(embed_dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_sizes=(7, 5, 6, 7),
             out_chans=32)


@pytest.mark.parametrize("img_size,patch_stride,grid", [(64, 1, 16), (128, 4, 8), (96, 1, 24)])
def test_output_shape(img_size: int, patch_stride: int, grid: int) -> None:
    torch.manual_seed(0)
    model = TinyViT(img_size=img_size, patch_stride=patch_stride, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 32, grid, grid)
    assert torch.isfinite(out).all()


def test_state_dict_keys_match_litemedsam_layout() -> None:
    with torch.device("meta"):
        keys = set(TinyViT().state_dict())
    for key in ("patch_embed.seq.0.c.weight", "patch_embed.seq.2.bn.running_var", "layers.0.blocks.0.conv1.c.weight",
                "layers.0.downsample.conv2.c.weight", "layers.1.blocks.0.attn.attention_biases",
                "layers.1.blocks.0.attn.qkv.weight", "layers.2.blocks.5.local_conv.bn.weight",
                "layers.3.blocks.1.mlp.norm.weight", "neck.0.weight", "neck.3.bias"):
        assert key in keys, key
    # the bias index table is rebuilt from the window size, never stored (the checkpoints lack it)
    assert not any("attention_bias_idxs" in k for k in keys)
    assert "layers.3.downsample.conv1.c.weight" not in keys
    with torch.device("meta"):
        mobile = TinyViT(img_size=1024, patch_stride=4)
    assert mobile.patch_embed.seq[0].c.weight.shape == (32, 3, 3, 3)
    assert mobile.patch_embed.seq[0].c.stride == (2, 2)


def test_attention_matches_explicit_softmax_with_bias() -> None:
    torch.manual_seed(0)
    attn = TinyViTAttention(dim=24, key_dim=8, num_heads=3, resolution=(4, 4))
    with torch.no_grad():
        attn.attention_biases.normal_()
    x = torch.randn(5, 16, 24)
    with torch.no_grad():
        got = attn(x)
        qkv = attn.qkv(attn.norm(x)).view(5, 16, 3, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([8, 8, 8], dim=3))
        weights = (q @ k.transpose(-2, -1) * 8 ** -0.5 + attn.attention_bias()).softmax(-1)
        want = attn.proj((weights @ v).transpose(1, 2).reshape(5, 16, 24))
    assert torch.allclose(got, want, atol=1e-5)
    # bias depends on |dy|, |dx| only: token 0 -> token 5 (1, 1) equals token 5 -> token 0
    bias = attn.attention_bias()
    assert torch.equal(bias[:, 0, 5], bias[:, 5, 0])


def test_qkv_channel_index_is_interleaved_per_head() -> None:
    attn = TinyViTAttention(dim=12, key_dim=4, num_heads=3, attn_ratio=1.5, resolution=(2, 2))  # d = 6
    out = torch.arange(attn.qkv.out_features).float().view(1, 1, -1)
    q, k, v = out.view(1, 1, 3, -1).split([4, 4, 6], dim=3)
    assert torch.equal(out[..., attn.qkv_channel_index("q")].flatten(), q.flatten())
    assert torch.equal(out[..., attn.qkv_channel_index("k")].flatten(), k.flatten())
    assert torch.equal(out[..., attn.qkv_channel_index("v")].flatten(), v.flatten())
    assert attn.qkv_channel_index("q")[:6].tolist() == [0, 1, 2, 3, 14, 15]


def test_wrong_input_size_is_a_user_error() -> None:
    model = TinyViT(img_size=64, **SMALL)
    with pytest.raises(ImedsamError, match="64"):
        model(torch.zeros(1, 3, 32, 32))


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    model = TinyViT(img_size=64, drop_path_rate=0.5, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert model(x).shape == (2, 32, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))




def test_parity_with_official_litemedsam_tinyvit() -> None:
    from tests.reference import lite_medsam_checkpoint, official_tiny_vit

    official_module = official_tiny_vit()
    path = lite_medsam_checkpoint()
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    official = official_module.TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, mbconv_expand_ratio=4.0,
        local_conv_size=3, layer_lr_decay=0.8,
    )
    official.load_state_dict(encoder_state, strict=True)
    ours = TinyViT(img_size=256)
    ours.load_state_dict(encoder_state, strict=True)
    official.eval()
    ours.eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad(), single_thread():
        want = official(x)
        got = ours(x)
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert (got - want).abs().max().item() <= 1e-4


def _conv_bn(groups: int = 1) -> Conv2dBN:
    torch.manual_seed(0)
    layer = Conv2dBN(8, 8, 3, 1, 1, groups=groups)
    layer.bn.running_mean.normal_(0, 0.5)
    layer.bn.running_var.uniform_(0.5, 2.0)
    layer.bn.weight.data.uniform_(0.5, 1.5)
    layer.bn.bias.data.normal_(0, 0.3)
    return layer


def _unfolded(layer: Conv2dBN, x: torch.Tensor) -> torch.Tensor:
    return layer.bn(layer.c(x))  # the two modules one after the other


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_bn_folds_in_eval_and_follows_weight_changes(groups):
    layer = _conv_bn(groups).eval()
    x = torch.randn(2, 8, 9, 7)
    layer(x)
    assert layer._folded is None  # trainable weights with gradients on: the modules run as they are
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _unfolded(layer, x), atol=1e-5, rtol=1e-5)
        assert layer._folded is not None  # inference: the folded path ran
        layer.c.weight.mul_(2.0)  # e.g. load_state_dict: the cache follows
        layer.bn.running_var.add_(1.0)
        torch.testing.assert_close(layer(x), _unfolded(layer, x), atol=1e-5, rtol=1e-5)


def test_conv_bn_made_under_inference_mode_folds_each_call_and_follows_changes():
    """Weights built or copied under ``torch.inference_mode`` are inference tensors, which track no version: the
    fold is computed afresh each call (no stale cache after an in-place change), inside and outside that mode."""
    x = torch.randn(2, 8, 9, 7)
    with torch.inference_mode():
        layer = _conv_bn().eval()
        assert layer.c.weight.is_inference()
        torch.testing.assert_close(layer(x), _unfolded(layer, x), atol=1e-5, rtol=1e-5)
        layer.c.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), _unfolded(layer, x), atol=1e-5, rtol=1e-5)
        assert layer._folded is not None and layer._folded[0] is None  # computed, never trusted as a cache
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _unfolded(layer, x), atol=1e-5, rtol=1e-5)


def test_conv_bn_trains_with_batch_statistics_and_frozen_layers_pass_gradients():
    layer = _conv_bn().train()
    x = torch.randn(4, 8, 5, 5)
    mean = layer.bn.running_mean.clone()
    out = layer(x)  # training: batch statistics, running statistics updated
    assert torch.allclose(out.mean(dim=(0, 2, 3)), layer.bn.bias.detach(), atol=1e-5)
    assert not torch.equal(layer.bn.running_mean, mean)
    frozen = _conv_bn().eval().requires_grad_(False)  # a frozen backbone layer while adapters train
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    frozen(x).square().sum().backward()
    y = x.detach().clone().requires_grad_(True)
    _unfolded(frozen, y).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("groups", [1, 8])
def test_conv_bn_gelu_fused_at_inference(approximate, groups):
    layer, act = _conv_bn(groups).eval(), torch.nn.GELU(approximate=approximate)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    expected = act(_unfolded(layer, x)).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer.with_gelu(x, act), expected, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer.with_gelu(x, act)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    x.requires_grad_(True)  # training through a frozen layer: the differentiable path
    layer.requires_grad_(False)
    layer.with_gelu(x, act).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
