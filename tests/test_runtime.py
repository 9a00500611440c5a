"""Runtime choices: storing frozen weights in the autocast dtype for inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imedsam.infer.segmenter import Segmenter
from imedsam.models.registry import build_system
from imedsam.runtime import cast_frozen_weights


def test_cast_frozen_weights_touches_only_fully_frozen_linear_and_conv() -> None:
    frozen_lin, frozen_conv, trainable = nn.Linear(4, 3), nn.Conv2d(2, 2, 3), nn.Linear(3, 2)
    norm = nn.LayerNorm(3)
    for mod in (frozen_lin, frozen_conv, norm):
        mod.requires_grad_(False)
    model = nn.ModuleList([frozen_lin, frozen_conv, trainable, norm])
    assert cast_frozen_weights(model, None) == 0 and frozen_lin.weight.dtype == torch.float32
    assert cast_frozen_weights(model, torch.bfloat16) == 2
    assert frozen_lin.weight.dtype == frozen_lin.bias.dtype == frozen_conv.weight.dtype == torch.bfloat16
    assert trainable.weight.dtype == torch.float32 and norm.weight.dtype == torch.float32
    assert cast_frozen_weights(model, torch.bfloat16) == 0  # idempotent


def test_segmenter_with_cast_weights_predicts_exactly_as_autocast_does() -> None:
    """Autocast rounds fp32 weights to bf16 on every call; storing them in bf16 once changes nothing."""
    image = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    torch.manual_seed(0)
    owned = Segmenter("tiny_vit_test", device="cpu", precision="bf16")  # built here: frozen, weights cast
    torch.manual_seed(0)
    system = build_system("tiny_vit_test")
    passed = Segmenter(system, device="cpu", precision="bf16")  # passed in: left in fp32
    assert owned.system.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert system.sam.image_encoder.patch_embed.proj.weight.dtype == torch.float32
    preds = []
    for seg in (owned, passed):
        seg.set_image(image)
        preds.append(seg.predict(box=(5, 6, 30, 25)).logits)
    np.testing.assert_array_equal(preds[0], preds[1])


def test_auto_precision_is_decided_by_measurement_and_cached(tmp_path, monkeypatch) -> None:
    """bf16 only when it measured clearly faster than fp32 here; the result is cached per CPU/threads/torch; CPUs
    without native bf16 get fp32 without measuring."""
    import imedsam.runtime as runtime

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "_CALIBRATION", {})
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    calls = []

    def slow_bf16(dtype):  # avx512_bf16 without AMX: bf16 below fp32 (the 167 vs 142 GFLOP/s)
        calls.append(dtype)
        return 167.0 if dtype == torch.float32 else 142.0

    cal = runtime.cpu_precision(measure=slow_bf16)
    assert cal.choice == "fp32" and cal.source == "measured" and len(calls) == 4
    assert runtime.autocast_dtype(torch.device("cpu"), "auto") is None
    assert runtime.autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16  # explicit choices stay
    monkeypatch.setattr(runtime, "_CALIBRATION", {})  # a new process: read from the cache, nothing measured
    again = runtime.cpu_precision(measure=slow_bf16)
    assert again.choice == "fp32" and again.source == "cache" and len(calls) == 4
    amx = runtime.cpu_precision(measure=lambda d: 150.0 if d == torch.float32 else 900.0, refresh=True)
    assert amx.choice == "bf16" and amx.bf16_gflops == 900.0
    assert runtime.autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16
    assert runtime.choose_precision(100.0, 110.0) == "fp32"  # within the margin: not worth bf16's rounding
    monkeypatch.setattr(runtime, "_CALIBRATION", {})
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path / "other"))
    plain = runtime.cpu_precision(measure=lambda d: pytest.fail("measured on a CPU without native bf16"))
    assert plain.choice == "fp32" and plain.source == "flags"


def test_calibration_key_follows_onednn_isa_limits(monkeypatch) -> None:
    """A calibration measured with AMX must not be reused where oneDNN is told not to use it."""
    import imedsam.runtime as runtime

    for name in runtime.ONEDNN_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = runtime._cpu_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    limited = runtime._cpu_key()
    assert limited != plain and limited.endswith("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert runtime._cpu_key() == plain


def test_measure_throughput_is_positive_and_quick() -> None:
    import time

    from imedsam.runtime import measure_throughput

    start = time.perf_counter()
    assert measure_throughput(torch.float32, repeats=1) > 0
    assert time.perf_counter() - start < 10  # a calibration, not a benchmark
