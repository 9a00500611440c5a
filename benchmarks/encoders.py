"""Encoder latency and peak memory per backbone at its native input size, 2 threads, batch 1, fp32.

Each backbone runs in its own subprocess so that its peak RSS is its own. Random weights (the cost does not
depend on them). Prints one JSON line per backbone:

    python benchmarks/encoders.py [--models litemedsam,mobilesam,sam_vit_b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DEFAULT = "litemedsam,mobilesam,sam_vit_b,sam_vit_l,sam_vit_h"


def measure(name: str, repeats: int, threads: int) -> dict:
    import resource
    import time

    import torch

    from imedsam.sam.build import build_sam

    torch.set_num_threads(threads)
    model = build_sam(name, pretrained=False).eval()
    size = model.preprocess.img_size
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.inference_mode():
        model.image_encoder(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.image_encoder(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return {"benchmark": "encoder", "model": name, "input": size, "threads": threads, "batch": 1,
            "precision": "fp32", "latency_s_median": round(times[len(times) // 2], 3),
            "latency_s_min": round(times[0], 3), "repeats": repeats,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params_m": round(sum(p.numel() for p in model.image_encoder.parameters()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats, args.threads)), flush=True)
        return
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    for name in args.models.split(","):
        subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats), "--threads",
                        str(args.threads)], env=env, check=False)


if __name__ == "__main__":
    main()
