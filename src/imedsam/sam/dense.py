"""Dense layers ``x @ W.T + b`` on oneDNN's CPU kernels, in training as in inference.

PyTorch runs an fp32 ``F.linear`` on CPU through MKL's sgemm and only bf16 through oneDNN. For the encoders'
shapes oneDNN's fp32 kernels can be much faster (AMD EPYC Zen 4, 2 cores: ViT-B's 576 x 768 -> 3072 layer
at 384^2 141 GFLOP/s with MKL, 205 with oneDNN; its input gradient 148 -> 189), and on other CPUs they may not
be, so which runs is measured once per machine (:func:`imedsam.runtime.fp32_linear_backend`, cached;
``IMEDSAM_FP32_LINEAR=aten|onednn`` forces it).

* :class:`Linear` is an ``nn.Linear`` (same parameters, same state-dict keys, ``isinstance`` holds) whose fp32
  CPU forward runs :func:`dense`; the encoders build their dense layers with it.
* :func:`dense` is exact fp32 (only the summation order differs from ``F.linear``). With autograd it is a
  function of its own: forward on oneDNN, the input gradient ``g @ W`` on oneDNN through the transposed VIEW of
  ``W`` (no copy of the weight), the weight and bias gradients, only when they are needed, as ATen does.
  Everything else (CUDA, autocast, bf16 tensors, tracing/ONNX export, ``torch.compile``, a machine where MKL
  measured faster) takes ``F.linear`` unchanged.
* :func:`linear` is the inference kernel with a fused activation (the implicit decoder's trunk), in fp32 and
  bf16, whatever the measurement says: its fusion is what pays there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imedsam.runtime import fp32_linear_backend, onednn_op_available

__all__ = ["Linear", "dense", "dense_act", "linear", "onednn_fp32_linear"]

_FUSED_LINEAR = onednn_op_available("_linear_pointwise")
_USE_ONEDNN: bool | None = None


def onednn_fp32_linear() -> bool:
    """Whether fp32 dense layers run on oneDNN in this process (measured or cached once, then remembered)."""
    global _USE_ONEDNN
    if _USE_ONEDNN is None:
        _USE_ONEDNN = _FUSED_LINEAR and fp32_linear_backend().choice == "onednn"
    return _USE_ONEDNN


def _exporting() -> bool:
    """Tracing, ONNX export or torch.compile: those know ATen's ops, not oneDNN's fused ones."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or bool(compiling and compiling())


def _fp32_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu"))


class _OneDNNLinear(torch.autograd.Function):
    """``x @ W.T + b`` for 2-D ``x`` (n, in) with oneDNN forward and input gradient; ATen's weight and bias
    gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (n, out) @ (out, in): weight.t() is a view, oneDNN reads its strides
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            grad_w = grad.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` (..., in), ``weight`` (out, in), ``bias`` (out,) or None ->
    (..., out); on oneDNN for fp32 CPU tensors where it measured faster (module docstring), with autograd."""
    if not (_fp32_cpu(x, weight, bias) and onednn_fp32_linear()) or _exporting():
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        # the function sees 2-D tensors: oneDNN returns an N-D result as a view, and a view made inside a custom
        # function may not be modified in place afterwards (LoRA adds into its base's output)
        out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def dense_act(layer: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(layer(x))`` (the first half of a transformer MLP). Where :func:`dense` runs oneDNN and nothing records
    gradients, an exact or tanh ``nn.GELU`` runs inside the dense kernel (one write of the (..., out) output
    instead of two passes); otherwise the two modules are called as they are."""
    if (type(act) is nn.GELU and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
            and _fp32_cpu(x, layer.weight, layer.bias) and onednn_fp32_linear() and not _exporting()):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], act.approximate)
    return act(layer(x))


class Linear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU forward runs :func:`dense` (oneDNN where it measured faster). Same
    parameters, keys and results; ``(..., in_features) -> (..., out_features)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` (then ReLU) for ``x`` (n, in); ``weight`` (out, in), contiguous, and ``bias``
    (out,) or None, both in x's dtype. Returns (n, out). Inference only (no autograd through the fused kernel).

    On CPU (fp32/bf16) this runs oneDNN's fused kernel: the output is written once instead of bias copy, GEMM
    and ReLU passes over a freshly allocated (n, out) buffer (about 10-30 % of the decoder's trunk time).
    """
    fused = _FUSED_LINEAR and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    if fused and not _exporting():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return out.relu_() if relu else out
