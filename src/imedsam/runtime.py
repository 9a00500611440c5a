"""Device, precision and threading choices, made in one place.

CPU is a first-class target: bf16 autocast is the big lever there (this machine's AVX-512 bf16 matmul runs at
about 3.7x its fp32 rate), and ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch at import time; the Makefile and the
CLI set it) makes allocation-heavy forwards several times faster in VMs.
"""

from __future__ import annotations

import contextlib
import os

import torch

from imedsam.errors import ImedsamError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu; explicit names are checked."""
    if isinstance(name, torch.device):
        return name
    name = str(name).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ImedsamError(f"--device: unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if base == "cuda" and not torch.cuda.is_available():
        raise ImedsamError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ImedsamError("--device mps: MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device and precision option (None = plain fp32).

    ``auto``: bf16 on CPU when the CPU supports it natively, bf16 on CUDA if supported else fp16, fp32 on MPS.
    """
    if precision not in PRECISIONS:
        raise ImedsamError(f"--precision: unknown value {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for the device, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_frozen_weights(module: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store the frozen ``nn.Linear``/``nn.Conv2d`` weights of ``module`` in the autocast ``dtype`` (inference).

    Autocast re-casts fp32 weights on every call (its cast cache only keeps tensors that require grad), which
    costs ViT-B about 80 ms per image in bf16 on 2 CPU cores. Storing the frozen base weights in the autocast
    dtype once gives the same results (autocast would round them to that dtype anyway) without the copies.
    Only modules whose parameters are ALL frozen are touched; trainable adapters stay fp32. Afterwards the
    module must run under ``autocast(dtype)``: for inference objects (:class:`imedsam.Segmenter`, evaluation),
    never for a model that is still trained. ``dtype=None`` (fp32) does nothing. Returns the number of
    modules cast.
    """
    if dtype is None:
        return 0
    count = 0
    for mod in module.modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        params = list(mod.parameters(recurse=False))
        if not params or any(p.requires_grad for p in params) or params[0].dtype == dtype:
            continue
        for p in params:
            p.data = p.data.to(dtype)
        count += 1
    return count


def prepare_for_inference(module: torch.nn.Module, device: torch.device,
                          dtype: torch.dtype | None) -> torch.nn.Module:
    """``module`` in eval mode on ``device``, frozen, with its Linear/Conv weights stored in the autocast ``dtype``
    (:func:`cast_frozen_weights`): for a model built only to predict (``Segmenter``, ``imedsam evaluate``)."""
    module = module.to(device).eval().requires_grad_(False)
    cast_frozen_weights(module, dtype)
    return module


def onednn_op_available(name: str) -> bool:
    """Whether oneDNN's fused CPU kernel ``torch.ops.mkldnn.<name>`` (e.g. ``_linear_pointwise``, the kernels
    torch.compile uses) is present in this PyTorch build."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return False


def enable_fast_allocation() -> None:
    """Ask PyTorch for transparent huge pages; effective only before torch is first imported."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: bytes per output pixel and mask that a prediction holds at once (float32 logits on the device and on the host,
#: their resize, the bool mask), a conservative bound used to refuse grids that cannot fit before any work
BYTES_PER_OUTPUT_PIXEL = 16


def check_output_grid(size: tuple[int, int], masks: int = 1, argument: str = "--size") -> None:
    """Refuse an output grid whose prediction alone would not fit in the available memory, saying what fits."""
    need = int(size[0]) * int(size[1]) * max(int(masks), 1) * BYTES_PER_OUTPUT_PIXEL
    free = available_memory()
    if free is None or need <= 0.8 * free:
        return
    side = int((0.8 * free / (max(int(masks), 1) * BYTES_PER_OUTPUT_PIXEL)) ** 0.5)
    raise ImedsamError(f"{argument}: a {size[0]}x{size[1]} output needs about {need / 1e9:.1f} GB for the "
                       f"prediction alone and {free / 1e9:.1f} GB are available; at most about {side}x{side} fits "
                       "here (the implicit decoder is chunked, but its output is not)")
