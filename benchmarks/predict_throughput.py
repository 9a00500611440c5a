"""`imedsam predict` throughput against `imedsam segment` per image and against the encoder alone (JSON lines).

Protocol: Kvasir-Sessile ``test`` images of ../shared/data (256x256 RGB), one box each (the tight box of the
ground-truth mask: ``--boxes-from masks/``), LiteMedSAM, ``--precision auto``, this machine's threads. Rows:

* ``encoder``: the Segmenter's ``set_image`` (preprocessing + image encoder) per image, model loaded, in process;
* ``predict_in_process``: :func:`imedsam.infer.folder.predict_folder` over the folder (read, encode, decode, write,
  predictions.csv), model loaded: the steady-state cost per image, compared with ``encoder``;
* ``predict_cli``: ``imedsam predict -i -o --boxes-from`` as a user runs it (process start and model load included);
* ``segment_cli``: ``imedsam segment IMG --box ... --out`` once per image (``--cli-images`` of them), the
  per-image loop that ``predict`` replaces.

Run with nothing else on the machine: ``python benchmarks/predict_throughput.py [--images 39] [--cli-images 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kvasir-sessile"


def _cases(n: int) -> list[str]:
    splits = json.loads((DATA / "splits.json").read_text())
    return sorted(splits["test"])[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=39)
    ap.add_argument("--cli-images", type=int, default=8)
    ap.add_argument("--model", default="litemedsam")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(json.dumps({"skipped": f"{DATA} not found"}))
        return 0
    from imedsam import io
    from imedsam.infer.folder import FolderSettings, predict_folder
    from imedsam.infer.segmenter import Segmenter
    from imedsam.runtime import cpu_precision

    cal = cpu_precision()
    names = _cases(args.images)
    head = {"benchmark": "predict_throughput", "model": args.model, "images": len(names), "threads": os.cpu_count(),
            "auto_precision": cal.choice, "calibration_fp32_gflops": cal.fp32_gflops,
            "calibration_bf16_gflops": cal.bf16_gflops, "protocol": "kvasir-sessile test, 256x256, one GT box each"}
    print(json.dumps(head), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, labels = Path(tmp) / "in", Path(tmp) / "labels"
        src.mkdir()
        labels.mkdir()
        for n in names:
            (src / f"{n}.jpg").symlink_to(DATA / "images" / f"{n}.jpg")
            (labels / f"{n}.png").symlink_to(DATA / "masks" / f"{n}.png")

        seg = Segmenter(args.model)
        rgbs = [io.to_display_rgb(io.read(src / f"{n}.jpg")) for n in names]
        seg.set_image(rgbs[0])  # warm-up
        t0 = time.perf_counter()
        for rgb in rgbs:
            seg.set_image(rgb)
        encoder = (time.perf_counter() - t0) / len(rgbs)
        print(json.dumps({"row": "encoder", "seconds_per_image": round(encoder, 4),
                          "images_per_s": round(1 / encoder, 2)}), flush=True)

        t0 = time.perf_counter()
        summary = predict_folder(seg, src, Path(tmp) / "out_inproc", boxes_from=labels, settings=FolderSettings(),
                                 progress=False)
        inproc = (time.perf_counter() - t0) / len(names)
        assert summary["done"] == len(names), summary
        print(json.dumps({"row": "predict_in_process", "seconds_per_image": round(inproc, 4),
                          "images_per_s": round(1 / inproc, 2), "over_encoder": round(inproc / encoder - 1, 3)}),
              flush=True)

        exe = [sys.executable, "-m", "imedsam.cli"]
        t0 = time.perf_counter()
        subprocess.run([*exe, "predict", "-i", str(src), "-o", str(Path(tmp) / "out_cli"), "--boxes-from",
                        str(labels), "--model", args.model], check=True, capture_output=True)
        cli = (time.perf_counter() - t0) / len(names)
        print(json.dumps({"row": "predict_cli", "seconds_per_image": round(cli, 4), "images_per_s": round(1 / cli, 2),
                          "note": "process start and model load included"}), flush=True)

        per_image = []
        for n in names[: args.cli_images]:
            mask = io.read(labels / f"{n}.png").array > 0
            ys, xs = np.nonzero(mask if mask.ndim == 2 else mask[..., 0])
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            t0 = time.perf_counter()
            subprocess.run([*exe, "segment", str(src / f"{n}.jpg"), "--box", *map(str, box), "--out",
                            str(Path(tmp) / f"seg_{n}.png"), "--model", args.model], check=True, capture_output=True)
            per_image.append(time.perf_counter() - t0)
        seg_cli = float(np.mean(per_image))
        print(json.dumps({"row": "segment_cli", "seconds_per_image": round(seg_cli, 4),
                          "images_per_s": round(1 / seg_cli, 2), "images": len(per_image)}), flush=True)
        print(json.dumps({"row": "summary", "predict_cli_vs_segment_cli": round(seg_cli / cli, 2),
                          "predict_in_process_over_encoder": round(inproc / encoder - 1, 3),
                          "targets": {"predict_cli_vs_segment_cli": ">= 3", "over_encoder": "<= 0.15"}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
