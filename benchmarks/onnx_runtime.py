"""onnxruntime against PyTorch on the same model, side by side: encoder and per-prompt decode latency, JSON lines.

The model is exported to a temporary folder (:func:`imedsam.export.onnx.export_onnx`); both runtimes then
segment the same synthetic image through :class:`imedsam.Segmenter` (fp32 on both sides, threads = the cores
this process may use, for torch and onnxruntime alike). Figures are medians of ``--repeats`` warm calls:

* ``encoder``: ``Segmenter.set_image`` (resize, normalise, pad, encode);
* ``decode``: ``Segmenter.predict`` of one box (prompt mapping, decoder, logits restored to the image grid), and
  of 3 points.

Random weights (``pretrained=False``: the cost does not depend on them), LiteMedSAM by default:

    python benchmarks/onnx_runtime.py [--model litemedsam] [--repeats 5] [--size 512]
    python benchmarks/onnx_runtime.py --quick      # tiny model, 2 repeats: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model: str, repeats: int, size: int, threads: int) -> list[dict]:
    import numpy as np
    import torch

    from imedsam.export.onnx import export_onnx, model_info
    from imedsam.infer.segmenter import Segmenter
    from imedsam.models.registry import build_system

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    system = build_system(model, pretrained=False)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(size, size + size // 4, 3), dtype=np.uint8)
    box = (size // 4, size // 4, size // 2 + size // 4, size // 2 + size // 8)
    points = np.array([[size // 2, size // 2], [size // 3, size // 3], [size // 2 + 5, size // 3]])
    labels = np.array([1, 0, 1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "onnx"
        export_onnx(system, folder, model=model_info(system, model, None))
        runtimes = {"torch": Segmenter(system, device="cpu", precision="fp32"),
                    "onnx": Segmenter(runtime="onnx", onnx_dir=str(folder))}
        figures: dict[str, dict[str, float]] = {}
        for name, seg in runtimes.items():
            seg.set_image(image)
            figures[name] = {
                "encoder": _median_seconds(lambda s=seg: s.set_image(image), repeats),
                "decode_box": _median_seconds(lambda s=seg: s.predict(box=box), repeats),
                "decode_3_points": _median_seconds(lambda s=seg: s.predict(points=points, point_labels=labels),
                                                   repeats),
            }
    common = {"benchmark": "onnx_runtime", "model": model, "image": [size, size + size // 4], "threads": threads,
              "precision": "fp32", "repeats": repeats}
    return [{**common, "stage": stage, "torch_s_median": round(figures["torch"][stage], 4),
             "onnx_s_median": round(figures["onnx"][stage], 4),
             "onnx_speedup": round(figures["torch"][stage] / max(figures["onnx"][stage], 1e-9), 2)}
            for stage in ("encoder", "decode_box", "decode_3_points")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam", help="a SAM-family backbone or adapted model name")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help="synthetic image height (width is 1.25x)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads of both runtimes (default: the cores available)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 repeats (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.repeats, args.size = "tiny_tinyvit_test", 2, 48
    for line in run(args.model, args.repeats, args.size, args.threads):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
