"""``torch.compile`` against eager PyTorch for the image encoders on CPU: is its compile cost paid back?

For each backbone and precision, in its own subprocess (so that no compiled code or cache is shared), with
random weights stored as :class:`imedsam.Segmenter` stores them (``runtime.prepare_for_inference``) and 2 threads:
the eager encoder's median over ``--repeats`` calls after one warm-up, then ``torch.compile`` (inductor, default
mode) of the same encoder: the first call's seconds (compiling included) and the median of the next calls. Prints
one JSON line per case, with the CPU's calibration and what ``--precision auto`` picks there
(``runtime.cpu_facts``), and ``break_even_images``: how many images a process (``predict`` over a folder, the web
page) must encode before compiling pays for itself (null when the compiled encoder is not faster).

    python benchmarks/compile.py [--models litemedsam,sam_vit_b] [--precisions fp32,bf16] [--repeats 5]

Inductor writes C++ and needs a compiler (``gcc``/``g++``); its on-disk cache is pointed at a fresh temporary
folder for each case, so every first call is a cold compile, as in a new process on a new machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SIZES = {"litemedsam": 256, "sam_vit_b": 384}


def measure(name: str, precision: str, repeats: int, threads: int) -> dict:
    import time

    import torch

    from imedsam.runtime import autocast, cpu_facts, prepare_for_inference
    from imedsam.sam.build import build_sam

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else None
    cpu = torch.device("cpu")
    model = prepare_for_inference(build_sam(name, img_size=SIZES.get(name), pretrained=False), cpu, dtype)
    encoder = model.image_encoder
    size = encoder.img_size
    x = torch.randn(1, 3, size, size)

    def timed(fn) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast(cpu, dtype):
            fn(x)
        return time.perf_counter() - start

    timed(encoder)  # warm-up: oneDNN builds its kernels on the first call
    eager = statistics.median(timed(encoder) for _ in range(repeats))
    compiled = torch.compile(encoder)
    first = timed(compiled)
    steady = statistics.median(timed(compiled) for _ in range(repeats))
    gain = eager - steady
    return {"benchmark": "compile", "model": name, "input": size, "precision": precision, **cpu_facts(),
            "eager_seconds": round(eager, 3), "compiled_seconds": round(steady, 3),
            "first_compiled_call_seconds": round(first, 1), "speedup": round(eager / steady, 2),
            "break_even_images": round((first - steady) / gain) if gain > 0 else None, "repeats": repeats,
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="litemedsam,sam_vit_b")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats, args.threads)), flush=True)
        return
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                done = subprocess.run([sys.executable, __file__, "--one", name, precision, "--repeats",
                                       str(args.repeats), "--threads", str(args.threads)],
                                      env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(json.dumps({"benchmark": "compile", "model": name, "precision": precision,
                                  "error": tail}), flush=True)
            else:
                print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
