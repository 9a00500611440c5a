"""One dense layer ``x @ W.T + b`` (then ReLU) for the implicit decoder's inference path, fused on CPU."""

from __future__ import annotations

import torch

from imedsam.runtime import onednn_op_available

__all__ = ["linear"]

_FUSED_LINEAR = onednn_op_available("_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` (then ReLU) for ``x`` (n, in); ``weight`` (out, in), contiguous, and ``bias``
    (out,) or None, both in x's dtype. Returns (n, out).

    On CPU (fp32/bf16) this runs oneDNN's fused kernel: the output is written once instead of bias copy, GEMM
    and ReLU passes over a freshly allocated (n, out) buffer (about 10-30 % of the decoder's trunk time).
    """
    fused = _FUSED_LINEAR and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    if fused and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):  # exporters know aten ops only
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return out.relu_() if relu else out
