"""inject_adapters on tiny ViT and TinyViT encoders: no-op LoRA at init, FA perturbation, freezing, gradients,
adapter files, and the exact reference-mode parameter counts of I-MedSAM on ViT-B (systems.md §A.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imedsam.errors import ImedsamError
from pydantic import ValidationError

from imedsam.peft import (
    FrequencyAdapter,
    LoRAQKV,
    PeftConfig,
    adapter_state_dict,
    frequency_image,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    save_adapters,
    trainable_parameters,
)
from imedsam.sam.tiny_vit import TinyViT
from imedsam.sam.vit import build_image_encoder_vit


def tiny_vit_encoder(seed: int = 0) -> nn.Module:
    """vit_tiny at 96 px: 6x6 tokens, window 4 (padded to 8: border windows hold zero padding)."""
    torch.manual_seed(seed)
    return build_image_encoder_vit("vit_tiny", img_size=96).eval()


def tiny_tinyvit_encoder(seed: int = 0) -> nn.Module:
    """TinyViT at 32 px: stage grids 32, 16, 8, 8; windows 5 and 3 force padding."""
    torch.manual_seed(seed)
    enc = TinyViT(img_size=32, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                  window_sizes=(7, 5, 3, 3), out_chans=16)
    with torch.no_grad():  # non-trivial frozen BatchNorm statistics
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return enc.eval()


ENCODERS = {"vit": (tiny_vit_encoder, 96), "tiny_vit": (tiny_tinyvit_encoder, 32)}


def _input(size: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fas(model: nn.Module) -> list[FrequencyAdapter]:
    """The frequency adapters, in block order (each in its block's mlp_parallel slot)."""
    return [m for m in model.modules() if isinstance(m, FrequencyAdapter)]


def _perturb_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("gate", [False, True])
def test_lora_is_exact_noop_at_init(kind: str, gate: bool) -> None:
    make, size = ENCODERS[kind]
    enc = make()
    ref = copy.deepcopy(enc)
    model = inject_adapters(enc, PeftConfig(frequency=False, lora_gate=gate))
    assert model is enc
    x = _input(size)
    with torch.no_grad():
        expected = ref(x)
        assert torch.equal(model(x), expected)
        _perturb_lora(model)
        assert not torch.allclose(model(x), expected)


@pytest.mark.parametrize("kind", ENCODERS)
def test_lora_changes_q_and_v_columns_only_in_real_blocks(kind: str) -> None:
    make, _ = ENCODERS[kind]
    model = inject_adapters(make(), PeftConfig(frequency=False))
    _perturb_lora(model)
    qkvs = [m for m in model.modules() if isinstance(m, LoRAQKV)]
    assert qkvs and all(q.layout == ("contiguous" if kind == "vit" else "interleaved") for q in qkvs)
    for qkv in qkvs:
        x = torch.randn(3, 4, qkv.in_features)
        with torch.no_grad():
            diff = qkv(x) - qkv.base(x)
        changed = diff.abs().amax(dim=(0, 1)) > 0
        expected = torch.zeros(qkv.out_features, dtype=torch.bool)
        expected[qkv.columns("q")] = True
        expected[qkv.columns("v")] = True
        assert torch.equal(changed, expected)


def test_tinyvit_lora_columns_follow_attention_layout() -> None:
    model = inject_adapters(tiny_tinyvit_encoder(), PeftConfig(frequency=False))
    for layer in model.layers[1:]:
        for block in layer.blocks:
            for t in ("q", "v"):
                assert torch.equal(block.attn.qkv.columns(t), block.attn.qkv_channel_index(t))


@pytest.mark.parametrize("kind", ENCODERS)
def test_frequency_adapter_scale_zero_is_noop_and_default_is_not(kind: str) -> None:
    make, size = ENCODERS[kind]
    x = _input(size)
    ref = make()
    with torch.no_grad():
        expected = ref(x)
        zero = inject_adapters(make(), PeftConfig(fa_scale=0.0))
        assert "frequency" in zero.streams and len(fas(zero)) == (4 if kind == "vit" else 4)
        torch.testing.assert_close(zero(x), expected, rtol=0, atol=1e-6)
        half = inject_adapters(make(), PeftConfig())
        assert (half(x) - expected).abs().max() > 1e-3  # FA perturbs SAM's features from step 0


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_fa_perturbation_follows_formula_on_one_block(mode: str) -> None:
    torch.manual_seed(0)
    enc = build_image_encoder_vit("vit_tiny", img_size=64, depth=1, global_attn_indexes=(0,)).eval()
    ref = copy.deepcopy(enc)
    cfg = PeftConfig(lora_rank=0, fa_scale=0.5)
    model = inject_adapters(enc, cfg, mode)
    fa = fas(model)[0]
    x = _input(64) * 2 - 0.5
    with torch.no_grad():
        got = model.forward_tokens(x)
        f0 = ref.embed(frequency_image(x, reference=(mode == "reference")))
        expected = ref.blocks[0](ref.embed(x)) + 0.5 * fa.step(f0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # at init the perturbation is 0.5 * (LN(F0) + up(GELU(down(LN(F0))))), LN(F0) has unit variance per
        # token, so SAM's tokens move by about 0.5 per channel from step 0
        ln = nn.functional.layer_norm(f0, (f0.shape[-1],), eps=1e-6)
        mlp_term = fa.up(nn.functional.gelu(fa.down(ln)))
        torch.testing.assert_close(got - ref.blocks[0](ref.embed(x)), 0.5 * (ln + mlp_term), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ENCODERS)
def test_only_adapters_train_and_gradients_flow(kind: str) -> None:
    make, size = ENCODERS[kind]
    model = inject_adapters(make(), PeftConfig())
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".mlp_parallel.frequency." in n for n in trainable)
    assert any(".mlp_parallel.frequency.norm." in n for n in trainable)  # paper mode: LN_f trains
    out = model(_input(size))
    assert out.shape[:2] == (2, 256 if kind == "vit" else 16)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_B" in n or ".down." in n or ".up." in n):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        if not p.requires_grad:
            assert p.grad is None, n


def test_reference_mode_freezes_fa_norm_and_adds_gate() -> None:
    model = inject_adapters(tiny_vit_encoder(), PeftConfig(), mode="reference")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".norm." in n for n in trainable)
    assert any(n.endswith("lora_gate.weight") for n in trainable)
    assert model.streams["frequency"].reference and not model.streams["frequency"].log_amplitude


def test_frozen_batchnorm_never_updates() -> None:
    enc = tiny_tinyvit_encoder()
    bn_before = {n: b.clone() for n, b in enc.named_buffers() if "running" in n}
    x = _input(32)
    with torch.no_grad():
        expected = inject_adapters(copy.deepcopy(enc), PeftConfig(fa_scale=0.0)).eval()(x)
    model = inject_adapters(enc, PeftConfig(fa_scale=0.0)).train()
    with torch.no_grad():
        out = model(x)
    # train mode = running statistics (batch statistics would differ by O(1); eval folds BN into the convs,
    # the first train-mode call does not: float rounding apart)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for n, b in model.named_buffers():
        if "running" in n:
            assert torch.equal(b, bn_before[n]), n


def test_valid_hw_reaches_frequency_image() -> None:
    model = inject_adapters(tiny_vit_encoder(), PeftConfig())
    x = _input(96)
    with torch.no_grad():
        a = model(x, valid_hw=(64, 80))
        b = model(x)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_lora_blocks_subset_and_wrapper_passthrough() -> None:
    model = inject_adapters(tiny_vit_encoder(), PeftConfig(lora_blocks=(0, 2)))
    wrapped = [isinstance(b.attn.qkv, LoRAQKV) for b in model.blocks]
    assert wrapped == [True, False, True, False]
    assert model.img_size == 96 and len(fas(model)) == 4
    with pytest.raises(ImedsamError, match="out of range"):
        inject_adapters(tiny_vit_encoder(), PeftConfig(lora_blocks=(7,)))


def test_user_errors() -> None:
    enc = tiny_vit_encoder()
    inject_adapters(enc, PeftConfig(frequency=False))
    with pytest.raises(ImedsamError, match="already has adapters"):
        inject_adapters(enc, PeftConfig())
    with pytest.raises(ImedsamError, match="attach to"):
        inject_adapters(nn.Linear(3, 3), PeftConfig())
    with pytest.raises(ValidationError, match="lora_rnk"):
        PeftConfig.model_validate({"lora_rnk": 4})
    with pytest.raises(ImedsamError, match="faithful"):
        inject_adapters(tiny_vit_encoder(), PeftConfig(), mode="faithful")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PeftConfig(lora_targets=("q", "z"))
    model = inject_adapters(tiny_vit_encoder(), PeftConfig())
    with pytest.raises(ImedsamError):
        model(torch.rand(1, 3, 64, 64))


def test_config_round_trip_and_mode_defaults() -> None:
    cfg = PeftConfig(lora_blocks=[3, 1], lora_targets=["q", "k"])  # type: ignore[arg-type]
    assert cfg.lora_blocks == (1, 3) and cfg.lora_targets == ("q", "k")
    assert cfg.gate("reference") and not cfg.log("reference") and not cfg.norm_trainable("reference")
    assert PeftConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert not cfg.gate("paper") and cfg.log("paper") and cfg.norm_trainable("paper")
    assert PeftConfig(lora_gate=False).gate("reference") is False


@pytest.mark.parametrize("kind", ENCODERS)
def test_save_load_round_trip(kind: str, tmp_path) -> None:
    make, size = ENCODERS[kind]
    cfg = PeftConfig(lora_rank=2)
    model = inject_adapters(make(), cfg, mode="reference")
    _perturb_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp_parallel.frequency." in name and p.requires_grad:
                p.add_(0.01)
    saved = cfg.model_dump(mode="json")
    path = save_adapters(tmp_path / "run" / "adapter.safetensors", model, {"peft": saved, "note": "x"})
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    state, config = load_adapters(path)
    assert config == {"peft": saved, "note": "x"}
    assert set(state) == set(adapter_state_dict(model))
    fresh = inject_adapters(make(), PeftConfig.model_validate(config["peft"]), mode="reference")
    x = _input(size)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        assert load_adapter_state_dict(fresh, state) == ([], [])
        assert torch.equal(fresh(x), model(x))


def test_load_adapter_state_dict_errors(tmp_path) -> None:
    model = inject_adapters(tiny_vit_encoder(), PeftConfig())
    state = dict(adapter_state_dict(model))
    missing_key = "blocks.0.mlp_parallel.frequency.down.weight"
    state.pop(missing_key)
    state["adapters.9.extra"] = torch.zeros(1)
    with pytest.raises(ImedsamError, match=r"missing 1 key\(s\): blocks\.0\.mlp_parallel\.frequency\.down\.weight.*"
                                           r"unexpected.*adapters\.9"):
        load_adapter_state_dict(model, state)
    assert load_adapter_state_dict(model, state, strict=False) == ([missing_key], ["adapters.9.extra"])
    bad = dict(adapter_state_dict(model))
    bad[missing_key] = torch.zeros(3, 3)
    with pytest.raises(ImedsamError, match="shape"):
        load_adapter_state_dict(model, bad)
    with pytest.raises(ImedsamError, match="not found"):
        load_adapters(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ImedsamError, match="not a readable"):
        load_adapters(junk)


def _vit_b_on_meta() -> nn.Module:
    with torch.device("meta"):
        return build_image_encoder_vit("vit_b", img_size=384)


def test_reference_mode_counts_vit_b_exact() -> None:
    counts = trainable_parameters(inject_adapters(_vit_b_on_meta(), PeftConfig(), mode="reference"))
    assert counts["frequency_adapter"] == 12 * ((768 * 4 + 4) + (4 * 768 + 768)) == 82_992
    assert counts["lora"] + counts["lora_gate"] == 12 * (2 * (768 * 4 + 4 * 768) + 768) == 156_672
    assert counts["lora_gate"] == 12 * 768 and counts["other"] == 0
    assert counts["total"] == 82_992 + 156_672


def test_paper_mode_counts_vit_b() -> None:
    counts = trainable_parameters(inject_adapters(_vit_b_on_meta(), PeftConfig()))
    assert counts["frequency_adapter"] == 82_992 + 12 * 2 * 768  # LN_f trains in paper mode
    assert counts["lora"] == 12 * 2 * (768 * 4 + 4 * 768) and counts["lora_gate"] == 0


def test_litemedsam_tinyvit_counts() -> None:
    with torch.device("meta"):
        enc = TinyViT()  # LiteMedSAM: dims (64, 128, 160, 320), depths (2, 2, 6, 2)
    counts = trainable_parameters(inject_adapters(enc, PeftConfig(), mode="reference"))
    blocks = [128] * 2 + [160] * 6 + [320] * 2
    assert counts["frequency_adapter"] == sum((d * 4 + 4) + (4 * d + d) for d in blocks)
    assert counts["lora"] + counts["lora_gate"] == sum(2 * (d * 4 + 4 * d) + d for d in blocks)


@pytest.mark.parametrize("gate", [False, True])
def test_windowed_lora_skips_projecting_padding_only_when_ungated(gate: bool) -> None:
    from imedsam.sam.vit import window_partition, window_unpartition

    model = inject_adapters(tiny_vit_encoder(), PeftConfig(frequency=False, lora_gate=gate))
    _perturb_lora(model)
    block = next(b for b in model.blocks if b.window_size > 0)
    # ungated LoRA is per token; the reference gate pools each padded window, so it must see the padding
    assert block.attn.pointwise_qkv is (not gate)
    x = block.norm1(torch.randn(2, 6, 6, block.attn.qkv.in_features))
    with torch.no_grad():
        windows, pad_hw = window_partition(x, block.window_size)
        padded = window_unpartition(block.attn(windows), block.window_size, pad_hw, (6, 6))
        torch.testing.assert_close(block.attention(x), padded, rtol=0, atol=1e-5)
