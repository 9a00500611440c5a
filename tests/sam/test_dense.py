"""fp32 dense layers on oneDNN (imedsam.sam.dense): same values and gradients as F.linear, chosen by measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import imedsam.runtime as runtime
import imedsam.sam.dense as dense_mod
from imedsam.errors import ImedsamError
from imedsam.sam.dense import Linear, dense

pytestmark = pytest.mark.skipif(not runtime.onednn_op_available("_linear_pointwise"),
                                reason="this PyTorch build has no oneDNN dense kernel (torch.ops.mkldnn)")


@pytest.fixture
def onednn(monkeypatch):
    """Force the oneDNN path in this process, whatever this machine measured."""
    monkeypatch.setattr(dense_mod, "_USE_ONEDNN", True)


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_f_linear(onednn, shape, train_weight, bias) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=gen)
    if len(shape) == 4:  # a channels-last view of a (B, C, H, W) map, not contiguous
        x0 = torch.randn(shape[0], shape[3], shape[1], shape[2], generator=gen).permute(0, 2, 3, 1)
    w0, b0 = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
    g = torch.randn(*shape[:-1], 6, generator=gen)
    grads = []
    for fn in (dense, F.linear):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_(train_weight)
        b = b0.clone().requires_grad_(train_weight) if bias else None
        out = fn(x, w, b)
        out.backward(g)
        grads.append(tuple(None if t is None else t.clone() for t in (out.detach(), x.grad, w.grad,
                                                                       None if b is None else b.grad)))
        if fn is dense:
            assert type(out.grad_fn).__name__ == "ViewBackward0"  # the 2-D function under a view
            assert "mkldnn::_linear_pointwise" in _ops(lambda: fn(x, w, b).sum().backward())
    for mine, ref in zip(*grads):
        if ref is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_output_can_be_modified_in_place_before_backward(onednn) -> None:
    """LoRA adds into its frozen base's output: a view made inside a custom function would refuse that."""
    lin = Linear(8, 12).requires_grad_(False)
    x = torch.randn(2, 3, 3, 8, requires_grad=True)
    out = lin(x)
    out[..., :4] += 1.0
    out.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, 3, 3, 8), rtol=1e-5, atol=1e-5)


def test_inference_runs_the_kernel_without_autograd(onednn) -> None:
    lin = Linear(5, 4).requires_grad_(False)
    x = torch.randn(3, 5)
    with torch.inference_mode():
        out = lin(x)
    assert out.grad_fn is None and "mkldnn::_linear_pointwise" in _ops(lambda: lin(x))
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias))


def test_autocast_bf16_tracing_and_aten_choice_take_f_linear(onednn, monkeypatch) -> None:
    lin = Linear(5, 4)
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast's own bf16 path, untouched
    traced = torch.jit.trace(lin, x)
    assert "mkldnn" not in str(traced.graph) and "linear" in str(traced.graph)
    monkeypatch.setattr(dense_mod, "_USE_ONEDNN", False)
    assert type(lin(x).grad_fn).__name__ == "AddmmBackward0"


def test_linear_is_an_nn_linear_with_the_same_state_dict_keys() -> None:
    lin = Linear(3, 2)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("backbone", ["tiny_vit_test", "tiny_tinyvit_test"])
def test_encoder_gradients_are_the_same_with_either_kernel(monkeypatch, backbone) -> None:
    """A tiny I-MedSAM's trainable gradients (LoRA, frequency adapters) agree between ATen and oneDNN kernels."""
    from imedsam.models.registry import build_system

    torch.manual_seed(0)
    system = build_system("imedsam", backbone=backbone)
    with torch.no_grad():  # LoRA B and the adapters off their zero initialisation, as after training
        for param in system.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    system.train()
    encoder = system.image_encoder
    images = torch.rand(1, 3, encoder.img_size, encoder.img_size)
    grads = []
    for use in (False, True):
        monkeypatch.setattr(dense_mod, "_USE_ONEDNN", use)
        system.zero_grad()
        (encoder(images) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 4 and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_backend_is_decided_by_measurement_cached_and_overridable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    monkeypatch.delenv(runtime.FP32_LINEAR_ENV, raising=False)
    monkeypatch.setattr(runtime, "_LINEAR", {})
    calls = []

    def amd(backend):  # the Zen 4 figures: MKL 141, oneDNN 205 GFLOP/s
        calls.append(backend)
        return 205.0 if backend == "onednn" else 141.0

    first = runtime.fp32_linear_backend(measure=amd)
    assert (first.choice, first.source, first.aten_gflops, first.onednn_gflops) == ("onednn", "measured", 141.0,
                                                                                     205.0)
    assert sorted(calls) == ["aten", "aten", "onednn", "onednn"]  # interleaved, two each
    monkeypatch.setattr(runtime, "_LINEAR", {})  # a new process reads the cache
    again = runtime.fp32_linear_backend(measure=lambda b: pytest.fail("measured although cached"))
    assert again.choice == "onednn" and again.source == "cache"
    close = runtime.fp32_linear_backend(measure=lambda b: 200.0 if b == "onednn" else 195.0, refresh=True)
    assert close.choice == "aten"  # within the margin: PyTorch's default stays
    assert runtime.cached_part_precisions() == {}  # not listed as a model part
    monkeypatch.setenv(runtime.FP32_LINEAR_ENV, "aten")
    forced = runtime.fp32_linear_backend(measure=lambda b: pytest.fail("measured although forced"))
    assert (forced.choice, forced.source) == ("aten", "env")
    monkeypatch.setenv(runtime.FP32_LINEAR_ENV, "mkl")
    with pytest.raises(ImedsamError, match="IMEDSAM_FP32_LINEAR='mkl': use one of aten, onednn"):
        runtime.fp32_linear_backend()


def test_measure_linear_is_positive_for_both_backends() -> None:
    assert runtime.measure_linear("aten", repeats=1) > 0 and runtime.measure_linear("onednn", repeats=1) > 0


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_first_half_fuses_gelu_in_inference_only(onednn, approximate) -> None:
    from imedsam.sam.dense import dense_act

    lin, act = Linear(6, 9).requires_grad_(False), torch.nn.GELU(approximate=approximate)
    x = torch.randn(4, 6)
    with torch.inference_mode():
        fused = dense_act(lin, act, x)
    torch.testing.assert_close(fused, act(F.linear(x, lin.weight, lin.bias)), rtol=1e-5, atol=1e-5)
    with torch.profiler.profile() as prof:
        with torch.inference_mode():
            dense_act(lin, act, x)
    assert "aten::gelu" not in {e.name for e in prof.events()}  # inside the dense kernel
    xg = x.clone().requires_grad_()
    dense_act(lin, act, xg).sum().backward()  # with autograd: the two modules, gradients as usual
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    relu = torch.nn.ReLU()
    torch.testing.assert_close(dense_act(lin, relu, x), relu(F.linear(x, lin.weight, lin.bias)))
