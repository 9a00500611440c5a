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


def test_cpu_facts_report_the_calibration_and_onednn_limits_that_benchmarks_print(tmp_path, monkeypatch) -> None:
    import imedsam.runtime as runtime

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "_CALIBRATION", {})
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.setattr(runtime, "_LINEAR", {})
    monkeypatch.delenv(runtime.FP32_LINEAR_ENV, raising=False)
    runtime.cpu_precision(measure=lambda d: 176.0 if d == torch.float32 else 73.0)  # cached for cpu_facts
    runtime.fp32_linear_backend(measure=lambda b: 205.0 if b == "onednn" else 141.0)
    facts = runtime.cpu_facts()
    assert facts["fp32_linear"] == "onednn" and facts["fp32_linear_gflops"] == {"aten": 141.0, "onednn": 205.0}
    assert facts["auto_precision"] == "fp32" and facts["cpu_native_bf16"] is True
    assert (facts["calibration_fp32_gflops"], facts["calibration_bf16_gflops"]) == (176.0, 73.0)
    assert facts["onednn_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    assert facts["threads"] == torch.get_num_threads() and isinstance(facts["cpu_amx_bf16"], bool)


def test_measure_throughput_is_positive_and_quick() -> None:
    import time

    from imedsam.runtime import measure_throughput

    start = time.perf_counter()
    assert measure_throughput(torch.float32, repeats=1) > 0
    assert time.perf_counter() - start < 10  # a calibration, not a benchmark


def _calibrated(runtime, fp32: float | None, bf16: float | None):
    """A machine calibration as cpu_precision would return it (fp32/bf16 GFLOP/s), for this CPU key."""
    choice = "bf16" if fp32 and bf16 and runtime.choose_precision(fp32, bf16) == "bf16" else "fp32"
    return lambda **_: runtime.PrecisionCalibration(choice, fp32, bf16, "measured", runtime._cpu_key())


def test_part_precision_measures_only_where_the_machine_calibration_does_not_settle_it(tmp_path, monkeypatch):
    """No native bf16: fp32 unmeasured; bf16 at least 2x fp32 in the GEMM (AMX): bf16 unmeasured; in between
    (avx512_bf16 without AMX) the part's own timings decide, cached per CPU key and part, shown and forgotten."""
    import imedsam.runtime as runtime

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "_PARTS", {})
    never = lambda dtype: pytest.fail("measured a part the machine calibration settles")  # noqa: E731
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(runtime, "cpu_precision", _calibrated(runtime, None, None))
    assert runtime.part_precision("lite encoder 256", never).choice == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_precision", _calibrated(runtime, 330.0, 1234.0))  # AMX
    amx = runtime.part_precision("lite encoder 256", never)
    assert amx.choice == "bf16" and amx.source == "calibration"
    monkeypatch.setattr(runtime, "cpu_precision", _calibrated(runtime, 289.0, 197.0))  # no AMX: fp32 machine-wide
    calls = []

    def encoder(dtype):  # the README's emulated figures: LiteMedSAM's encoder 0.90 s fp32, 0.79 s bf16
        calls.append(dtype)
        return 0.90 if dtype == torch.float32 else 0.79

    enc = runtime.part_precision("lite encoder 256", encoder)
    assert enc.choice == "bf16" and enc.source == "measured" and calls == [torch.float32, torch.bfloat16]
    dec = runtime.part_precision("lite decoder 256", lambda d: 0.030 if d == torch.float32 else 0.043)
    assert dec.choice == "fp32" and dec.bf16_seconds == 0.043
    close = runtime.part_precision("vit encoder 384", lambda d: 1.00 if d == torch.float32 else 0.97)
    assert close.choice == "fp32"  # within PART_MARGIN: not worth bf16's rounding
    monkeypatch.setattr(runtime, "_PARTS", {})  # a new process: from the cache file, nothing measured
    again = runtime.part_precision("lite encoder 256", never)
    assert again.choice == "bf16" and again.source == "cache" and again.fp32_seconds == 0.9
    shown = runtime.cached_part_precisions()
    assert shown["lite encoder 256"] == {"choice": "bf16", "fp32_seconds": 0.9, "bf16_seconds": 0.79}
    assert set(shown) == {"lite encoder 256", "lite decoder 256", "vit encoder 384"}
    assert runtime.forget_part_precisions() == 3 and runtime.cached_part_precisions() == {}
    assert runtime.part_precision("lite encoder 256", encoder).source == "measured"  # measured again


def test_segmenter_runs_its_encoder_and_decoder_each_in_its_own_auto_precision(tmp_path, monkeypatch):
    """An encoder chosen bf16 and a decoder chosen fp32: the encoder's weights are stored in bf16, the rest stay
    fp32, and a prediction equals the hand-made one (bf16 autocast encoding, fp32 decoding of its embedding);
    both parts were timed on the real model in both precisions. Stack models keep one precision."""
    import imedsam.infer.part_precision as parts
    import imedsam.runtime as runtime

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    timed = []

    def decide(name, measure):  # the real timing code runs; the decision is injected
        timed.extend((name.split()[-2], measure(dtype) > 0) for dtype in (torch.float32, torch.bfloat16))
        choice = "bf16" if " encoder " in name else "fp32"
        return runtime.PartPrecision(choice, None, None, "measured", name)

    monkeypatch.setattr(parts, "part_precision", decide)
    monkeypatch.setattr(runtime, "cpu_precision", _calibrated(runtime, 289.0, 197.0))
    image = np.random.default_rng(1).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    torch.manual_seed(0)
    seg = Segmenter("tiny_vit_test", device="cpu", precision="auto")
    assert timed == [("encoder", True)] * 2 + [("decoder", True)] * 2
    assert seg.encode_dtype is torch.bfloat16 and seg.amp_dtype is None
    assert seg.system.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert seg.system.sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.dtype == torch.float32
    seg.set_image(image)
    got = seg.predict(box=(5, 6, 30, 25)).logits
    torch.manual_seed(0)
    ref = build_system("tiny_vit_test").eval()
    from imedsam.models.views import encode_views, parse_tta

    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (encoded,) = encode_views(ref, image, parse_tta(None), torch.device("cpu"))
        out = ref.decode(encoded.embedding.float(), encoded.prepared,
                         encoded.prompts(np.array([5.0, 6.0, 30.0, 25.0])))
    np.testing.assert_array_equal(got, out.logits[0].float().numpy())
    timed.clear()
    stacks = Segmenter("ma_sam", backbone="tiny_tinyvit_test", device="cpu", precision="auto")
    assert timed == [] and stacks.encode_dtype is stacks.amp_dtype is None  # the machine's fp32
    lite = Segmenter("tiny_tinyvit_test", device="cpu", precision="auto")  # TinyViT: folded, fused Conv2dBN
    assert timed == [("encoder", True)] * 2 + [("decoder", True)] * 2 and lite.encode_dtype is torch.bfloat16
    lite.set_image(image)
    assert np.isfinite(lite.predict(box=(5, 6, 30, 25)).logits).all()
