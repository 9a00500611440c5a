"""Device, precision and threading choices, made in one place.

CPU is a first-class target. bf16 autocast is the big lever on CPUs whose bf16 matmuls are really fast (AMX:
3.5-10x fp32), but a CPU can advertise ``avx512_bf16`` and still run bf16 slower than fp32 (oneDNN without AMX),
so ``--precision auto`` on CPU is decided by MEASUREMENT (:func:`cpu_precision`): a GEMM and a convolution timed
in fp32 and in bf16 (well under a second), the first time on a machine, cached per CPU, thread count and torch
version. ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch at import time; the Makefile and the CLI set it) makes
allocation-heavy forwards several times faster in VMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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

    ``auto``: on CPU bf16 when it measured faster than fp32 here (:func:`cpu_precision`), else fp32; bf16 on
    CUDA if supported else fp16; fp32 on MPS.
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
        return torch.bfloat16 if cpu_precision().choice == "bf16" else None
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


#: bf16 must be at least this much faster than fp32 to be chosen (autocast casts cost time, bf16 costs precision)
BF16_MARGIN = 1.15


@dataclass(frozen=True)
class PrecisionCalibration:
    """What ``--precision auto`` chose on this CPU and why.

    Attributes:
        choice: ``"bf16"`` or ``"fp32"``.
        fp32_gflops, bf16_gflops: measured throughput of the calibration work (GEMM + convolution), or None
            when not measured (no native bf16 in the CPU flags: bf16 is emulated and always slower).
        source: ``"measured"`` (now), ``"cache"`` (an earlier measurement on this machine) or ``"flags"``.
        key: what the cache entry is for (CPU model and flags, threads, torch version).
    """

    choice: str
    fp32_gflops: float | None
    bf16_gflops: float | None
    source: str
    key: str


def choose_precision(fp32_gflops: float, bf16_gflops: float, margin: float = BF16_MARGIN) -> str:
    """``"bf16"`` when bf16 ran at least ``margin`` times the fp32 throughput, else ``"fp32"``."""
    return "bf16" if bf16_gflops >= margin * fp32_gflops else "fp32"


def measure_throughput(dtype: torch.dtype, *, repeats: int = 3) -> float:
    """GFLOP/s of a 1024^3 GEMM plus a 3x3 convolution (64 -> 64 channels, 96^2) in ``dtype`` on this CPU at the
    current thread count: the two kinds of work the encoders spend their time in. Best of ``repeats`` after one
    warm-up call; about 0.1-0.5 s in all."""
    n, c, hw = 1024, 64, 96
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    x = torch.randn(1, c, hw, hw, generator=gen).to(dtype)
    w = torch.randn(c, c, 3, 3, generator=gen).to(dtype)
    flops = 2 * n ** 3 + 2 * c * c * 9 * hw * hw
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            torch.mm(a, b)
            torch.nn.functional.conv2d(x, w, padding=1)
            elapsed = time.perf_counter() - start
            if i:
                best = min(best, elapsed)
    return flops / best / 1e9


def _cache_dir() -> Path:
    root = os.environ.get("IMEDSAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imedsam")
    return Path(root)


#: environment variables that change which oneDNN kernels run, hence the calibration (part of its cache key)
ONEDNN_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")


def onednn_settings() -> dict[str, str]:
    """The :data:`ONEDNN_ENV` variables set in this process (benchmarks print them beside their figures)."""
    return {name: os.environ[name] for name in ONEDNN_ENV if os.environ.get(name)}


def cpu_facts() -> dict:
    """What ``--precision auto`` picks on this CPU and why, as benchmarks print it beside every figure: threads,
    the CPU flags (``cpu_native_bf16``: avx512_bf16 or amx_bf16; ``cpu_amx_bf16``), the calibration's choice and
    GFLOP/s (:func:`cpu_precision`, cached per machine), the kernels of fp32 dense layers
    (:func:`fp32_linear_backend`) and the oneDNN limits set in the environment."""
    try:
        amx = "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        amx = False
    cal, lin = cpu_precision(), fp32_linear_backend()
    return {"threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_fast_bf16(), "cpu_amx_bf16": amx,
            "auto_precision": cal.choice, "calibration_fp32_gflops": cal.fp32_gflops,
            "calibration_bf16_gflops": cal.bf16_gflops, "fp32_linear": lin.choice,
            "fp32_linear_gflops": {"aten": lin.aten_gflops, "onednn": lin.onednn_gflops},
            "onednn_env": onednn_settings()}


def _cpu_key() -> str:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        info = platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    digest = hashlib.sha1(f"{model}|{flags}".encode()).hexdigest()[:12]
    # oneDNN's kernel choice can be limited from the environment (e.g. ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 turns
    # AMX off): a measurement holds only for the same settings
    onednn = " ".join(f"{name}={value}" for name, value in onednn_settings().items())
    return (f"{model} [{digest}] threads={torch.get_num_threads()} torch={torch.__version__}"
            + (f" {onednn}" if onednn else ""))


_CALIBRATION: dict[str, PrecisionCalibration] = {}


def _cache_path() -> Path:
    return _cache_dir() / "precision.json"


def _read_cache() -> dict:
    try:
        entries = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(key: str, entry: dict) -> None:
    """Add one entry to the cache file (re-read first: another process may have added its own), atomically."""
    path = _cache_path()
    entries = {**_read_cache(), key: entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time


def _recall(memo: dict, key: str, cls: type, refresh: bool):
    """The decision cached for ``key``: from this process's ``memo``, else from the cache file (as ``cls`` with
    ``source="cache"``, remembered in ``memo``); None when ``refresh``, absent, or an entry of another version."""
    if refresh:
        return None
    if key in memo:
        return memo[key]
    entry = _read_cache().get(key)
    if isinstance(entry, dict):
        try:
            memo[key] = cls(**{**entry, "source": "cache"})
        except TypeError:
            return None  # written by another version: measure again
        return memo[key]
    return None


def cpu_precision(*, measure=measure_throughput, refresh: bool = False) -> PrecisionCalibration:
    """The CPU's ``--precision auto`` choice: from this process's memory, else the cache file (``$IMEDSAM_CACHE``
    or ``~/.cache/imedsam/precision.json``, one entry per CPU/threads/torch key), else measured now with
    ``measure(dtype) -> GFLOP/s`` and written to the cache (atomically). CPUs without native bf16 in their flags
    get fp32 without measuring. ``refresh`` measures again."""
    key = _cpu_key()
    found = _recall(_CALIBRATION, key, PrecisionCalibration, refresh)
    if found is not None:
        return found
    if not cpu_has_fast_bf16():
        result = PrecisionCalibration("fp32", None, None, "flags", key)
    else:
        # interleaved, best of each: a burst of other work on the machine hits both alike
        runs = [(dtype, measure(dtype)) for _ in range(2) for dtype in (torch.float32, torch.bfloat16)]
        fp32 = max(v for d, v in runs if d == torch.float32)
        bf16 = max(v for d, v in runs if d == torch.bfloat16)
        result = PrecisionCalibration(choose_precision(fp32, bf16), round(fp32, 1), round(bf16, 1), "measured", key)
        _write_cache(key, asdict(result))
    _CALIBRATION[key] = result
    return result


#: oneDNN's fp32 dense layers must be at least this much faster than ATen's (MKL) to be used
ONEDNN_LINEAR_MARGIN = 1.05

#: ``IMEDSAM_FP32_LINEAR=aten|onednn`` forces the fp32 dense-layer kernels (benchmarks compare the two side by side)
FP32_LINEAR_ENV = "IMEDSAM_FP32_LINEAR"
FP32_LINEAR_BACKENDS = ("aten", "onednn")


@dataclass(frozen=True)
class LinearBackend:
    """Which kernels run the encoders' fp32 dense layers on this CPU (:mod:`imedsam.sam.dense`) and why.

    Attributes:
        choice: ``"onednn"`` (``torch.ops.mkldnn._linear_pointwise``) or ``"aten"`` (``F.linear``: MKL's sgemm).
        aten_gflops, onednn_gflops: measured throughput of the calibration layer, or None when not measured.
        source: ``"measured"``, ``"cache"``, ``"env"`` (:data:`FP32_LINEAR_ENV`) or ``"unavailable"`` (no
            oneDNN kernel in this PyTorch build).
        key: the cache key (the CPU key of :func:`cpu_precision` plus ``# fp32 linear``).
    """

    choice: str
    aten_gflops: float | None
    onednn_gflops: float | None
    source: str
    key: str


def measure_linear(backend: str, *, repeats: int = 3) -> float:
    """GFLOP/s of one ViT-B MLP layer at 384^2 (576 tokens, 768 -> 3072, with bias) and its input gradient
    (3072 -> 768 through the transposed weight, as training computes it) in fp32 with ``backend`` (``"aten"`` or
    ``"onednn"``) at the current thread count. Best of ``repeats`` after one warm-up call; about 0.1 s."""
    n, c_in, c_out = 576, 768, 3072
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(n, c_in, generator=gen), torch.randn(n, c_out, generator=gen)
    w, b = torch.randn(c_out, c_in, generator=gen), torch.randn(c_out, generator=gen)
    if backend == "onednn":
        kernel = torch.ops.mkldnn._linear_pointwise

        def work() -> None:
            kernel(x, w, b, "none", [], "")
            kernel(g, w.t(), None, "none", [], "")
    else:
        def work() -> None:
            torch.nn.functional.linear(x, w, b)
            torch.mm(g, w)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            work()
            elapsed = time.perf_counter() - start
            if i:
                best = min(best, elapsed)
    return 4 * n * c_in * c_out / best / 1e9


_LINEAR: dict[str, LinearBackend] = {}


def fp32_linear_backend(*, measure=measure_linear, refresh: bool = False) -> LinearBackend:
    """The kernels for fp32 dense layers on CPU: :data:`FP32_LINEAR_ENV` if set, else this process's memory, the
    cache (as :func:`cpu_precision`, key ``<cpu key> # fp32 linear``) or measured now with
    ``measure(backend) -> GFLOP/s``, interleaved, best of two each: oneDNN when it is at least
    :data:`ONEDNN_LINEAR_MARGIN` times ATen. (AMD Zen 4, 2 cores: MKL runs the ViT's 768-wide layers at
    140-150 GFLOP/s and oneDNN at 190-205.) ``refresh`` measures again."""
    forced = os.environ.get(FP32_LINEAR_ENV, "").strip().lower()
    key = f"{_cpu_key()} # fp32 linear"  # not "| ": part decisions use that separator
    if forced:
        if forced not in FP32_LINEAR_BACKENDS:
            raise ImedsamError(f"{FP32_LINEAR_ENV}={forced!r}: use one of {', '.join(FP32_LINEAR_BACKENDS)} "
                               "(or unset it to let imedsam measure)")
        if forced == "onednn" and not onednn_op_available("_linear_pointwise"):
            raise ImedsamError(f"{FP32_LINEAR_ENV}=onednn: this PyTorch build has no oneDNN dense kernel; unset it")
        return LinearBackend(forced, None, None, "env", key)
    if not onednn_op_available("_linear_pointwise"):
        return LinearBackend("aten", None, None, "unavailable", key)
    found = _recall(_LINEAR, key, LinearBackend, refresh)
    if found is not None:
        return found
    runs = [(backend, measure(backend)) for _ in range(2) for backend in FP32_LINEAR_BACKENDS]
    aten = max(v for b, v in runs if b == "aten")
    onednn = max(v for b, v in runs if b == "onednn")
    result = LinearBackend("onednn" if onednn >= ONEDNN_LINEAR_MARGIN * aten else "aten", round(aten, 1),
                           round(onednn, 1), "measured", key)
    _write_cache(key, asdict(result))
    _LINEAR[key] = result
    return result


#: the machine calibration's bf16/fp32 throughput ratio from which every part takes bf16 without being measured
#: (AMX: 3.5-10x); below it (and with native bf16 in the flags) a model part's own work decides
CLEAR_BF16_RATIO = 2.0


@dataclass(frozen=True)
class PartPrecision:
    """What ``--precision auto`` chose for one part of a model (e.g. LiteMedSAM's encoder) on this CPU.

    Attributes:
        choice: ``"bf16"`` or ``"fp32"``.
        fp32_seconds, bf16_seconds: the part's measured time per call, or None when the machine calibration
            decided (no native bf16, or bf16 at least :data:`CLEAR_BF16_RATIO` times fp32 in the GEMM).
        source: ``"measured"``, ``"cache"`` or ``"calibration"`` (the machine's decision, not measured).
        key: the cache key (the CPU key of :func:`cpu_precision` and the part's name).
    """

    choice: str
    fp32_seconds: float | None
    bf16_seconds: float | None
    source: str
    key: str


#: a part measured on its own work (casts included) takes bf16 when fp32 took at least this much longer
PART_MARGIN = 1.05

_PARTS: dict[str, PartPrecision] = {}


def part_precision(name: str, measure, *, refresh: bool = False) -> PartPrecision:
    """``--precision auto`` for one part of a model on this CPU (``name``, e.g. ``"litemedsam encoder 256"``).

    One GEMM decides a whole machine well where bf16 is far ahead (AMX) or not native at all, but in between a
    model's parts differ: with oneDNN on ``avx512_core_bf16`` and no AMX, LiteMedSAM's encoder ran faster in
    bf16 while matrix products, ViT-B and the decoders ran faster in fp32 (README). So: no native bf16 in the
    flags -> fp32; the machine calibration (:func:`cpu_precision`) measured bf16 at least
    :data:`CLEAR_BF16_RATIO` times fp32 -> bf16; otherwise ``measure(dtype) -> seconds`` of the part's own work
    decides (bf16 when fp32 takes at least :data:`PART_MARGIN` times as long), cached like the calibration under the
    CPU key plus ``name``. ``refresh`` measures again."""
    cal = cpu_precision()
    key = f"{cal.key} | {name}"
    if not cpu_has_fast_bf16() or cal.fp32_gflops is None or cal.bf16_gflops is None:
        return PartPrecision("fp32", None, None, "calibration", key)
    if cal.bf16_gflops >= CLEAR_BF16_RATIO * cal.fp32_gflops:
        return PartPrecision("bf16", None, None, "calibration", key)
    found = _recall(_PARTS, key, PartPrecision, refresh)
    if found is not None:
        return found
    fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
    result = PartPrecision("bf16" if fp32 >= PART_MARGIN * bf16 else "fp32", round(fp32, 4), round(bf16, 4),
                           "measured", key)
    _write_cache(key, asdict(result))
    _PARTS[key] = result
    return result


def forget_part_precisions() -> int:
    """Drop this CPU key's cached part decisions (``imedsam info --recalibrate``): each part is measured again
    when next used. Returns how many were dropped."""
    prefix = f"{_cpu_key()} | "
    entries = _read_cache()
    stale = [k for k in entries if k.startswith(prefix)]
    for k in list(_PARTS):
        if k.startswith(prefix):
            del _PARTS[k]
    if stale:
        path = _cache_path()
        try:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in entries.items() if k not in stale}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    return len(stale)


def cached_part_precisions() -> dict[str, dict]:
    """Every part decision cached for this CPU key (``imedsam info``): part name -> choice and timings."""
    prefix = f"{_cpu_key()} | "
    return {k[len(prefix):]: {f: v.get(f) for f in ("choice", "fp32_seconds", "bf16_seconds")}
            for k, v in _read_cache().items() if k.startswith(prefix) and isinstance(v, dict)}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for the device, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_frozen_weights(module: torch.nn.Module, dtype: torch.dtype | None,
                        skip: torch.nn.Module | None = None) -> int:
    """Store the frozen ``nn.Linear``/``nn.Conv2d`` weights of ``module`` in the autocast ``dtype`` (inference).

    Autocast re-casts fp32 weights on every call (its cast cache only keeps tensors that require grad), which
    costs ViT-B about 80 ms per image in bf16 on 2 CPU cores. Storing the frozen base weights in the autocast
    dtype once gives the same results (autocast would round them to that dtype anyway) without the copies.
    Only modules whose parameters are ALL frozen are touched; trainable adapters stay fp32. Afterwards the
    module must run under ``autocast(dtype)``: for inference objects (:class:`imedsam.Segmenter`, evaluation),
    never for a model that is still trained. ``dtype=None`` (fp32) does nothing. ``skip``: a submodule left as it
    is (a part that runs in another precision). Returns the number of modules cast.
    """
    if dtype is None:
        return 0
    count = 0
    skipped = set() if skip is None else {id(m) for m in skip.modules()}
    for mod in module.modules():
        if id(mod) in skipped:
            continue
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        params = list(mod.parameters(recurse=False))
        if not params or any(p.requires_grad for p in params) or params[0].dtype == dtype:
            continue
        for p in params:
            p.data = p.data.to(dtype)
        count += 1
    return count


def prepare_for_inference(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, *,
                          part: torch.nn.Module | None = None,
                          part_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module`` in eval mode on ``device``, frozen, with its Linear/Conv weights stored in the autocast ``dtype``
    (:func:`cast_frozen_weights`): for a model built only to predict (``Segmenter``, ``imedsam evaluate``).
    ``part`` (a submodule, e.g. the image encoder) gets ``part_dtype`` instead, and must run under its autocast."""
    module = module.to(device).eval().requires_grad_(False)
    if part is not None:
        cast_frozen_weights(part, part_dtype)
    cast_frozen_weights(module, dtype, skip=part)
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


def last_level_cache_bytes() -> int | None:
    """Size in bytes of the CPU's largest cache level (Linux sysfs, else ``sysconf``), or None when unknown."""
    best: tuple[int, int] | None = None
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in root.glob("index*"):
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
            if best is None or level > best[0]:
                best = (level, size)
    except (OSError, ValueError):
        best = None
    if best is not None:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if value and value > 0:
            return int(value)
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
