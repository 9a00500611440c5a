"""`imedsam serve` latency and load, on loopback only (JSON lines on stdout).

Starts ``imedsam serve`` in its own process (LiteMedSAM by default) and measures, with nothing else running:

* ``latency``: on a Kvasir-Sessile test image (256x256 RGB; the pydicom CT slice when the shared data is absent):
  the first box on the image (upload excluded; the embedding is computed by it), then clicks answered from the
  cached embedding (p50/p95 over ``--clicks``); on an LA MRI test volume (640x640 slices) the first box on each of
  ``--slices`` new slices. Times are the client's (HTTP round trip included).
* ``load``: ``--clients`` concurrent clients x ``--prompts`` clicks each on one warm session; counts status codes
  (503s are the server refusing beyond ``--max-queue``, on purpose), p50/p95 latency, wall time.
* ``corrupt``: a burst of corrupt uploads at once, then whether the server still answers a prompt.
* ``server``: the server's peak RSS (VmHWM) over the whole run.

Usage: ``python benchmarks/serve_load.py [--quick]`` (``--quick``: a tiny random model and a few requests, for the
smoke test; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

try:  # the test extra installs httpx2 (Starlette's test client uses it); plain httpx has the same client API
    import httpx2 as httpx
except ImportError:
    import httpx

# benchmarks/imedsam.py is named like the package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def _images(quick: bool) -> tuple[Path, Path | None]:
    from imedsam.io.samples import embedded_ct_slice

    image = embedded_ct_slice()
    kvasir = SHARED / "kvasir-sessile" / "images"
    if not quick and kvasir.is_dir():
        splits = json.loads((SHARED / "kvasir-sessile" / "splits.json").read_text())
        image = kvasir / f"{sorted(splits['test'])[0]}.jpg"
    volume = None
    la = SHARED / "la-mri" / "imagesTs"
    if not quick and la.is_dir():
        volume = sorted(la.glob("*.nii.gz"))[0]
    return image, volume


def _open(client: httpx.Client, path: Path) -> dict:
    r = client.post("/api/sessions", params={"filename": path.name}, content=path.read_bytes())
    r.raise_for_status()
    return r.json()


def _timed(client: httpx.Client, sid: str, body: dict) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = client.post(f"/api/sessions/{sid}/segment", json=body)
    return time.perf_counter() - t0, r


def latency(client: httpx.Client, image: Path, volume: Path | None, clicks: int, slices: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    info = _open(client, image)
    h, w = info["shape"][1:]
    box = [w * 0.25, h * 0.25, w * 0.75, h * 0.75]
    first, r = _timed(client, info["id"], {"box": box})
    r.raise_for_status()
    times = []
    for _ in range(clicks):
        x, y = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
        t, r = _timed(client, info["id"], {"point": [x, y], "label": int(rng.integers(0, 2))})
        r.raise_for_status()
        times.append(t)
    out = {"case": "latency", "image": image.name, "size": [h, w], "first_prompt_ms": round(first * 1000, 1),
           "click_p50_ms": _pct(times, 50), "click_p95_ms": _pct(times, 95), "clicks": clicks}
    if volume is not None:
        vinfo = _open(client, volume)
        d, vh, vw = vinfo["shape"]
        firsts = []
        for k in np.linspace(d * 0.3, d * 0.7, slices).astype(int):
            t, r = _timed(client, vinfo["id"], {"slice": int(k), "box": [vw * .3, vh * .3, vw * .6, vh * .6]})
            r.raise_for_status()
            firsts.append(t)
        out.update(volume=volume.name, volume_shape=[d, vh, vw], first_prompt_new_slice_p50_ms=_pct(firsts, 50),
                   first_prompt_new_slice_max_ms=round(max(firsts) * 1000, 1), new_slices=slices)
    return out


def load(url: str, headers: dict, image: Path, clients: int, prompts: int, seed: int) -> dict:
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        info = _open(c, image)
        sid = info["id"]
        h, w = info["shape"][1:]
        c.post(f"/api/sessions/{sid}/segment", json={"box": [w * .25, h * .25, w * .75, h * .75]}).raise_for_status()
    codes: dict[int, int] = {}
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = np.random.default_rng(seed + n)
        with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
            for _ in range(prompts):
                body = {"object": n + 1, "point": [float(rng.uniform(w * .3, w * .7)),
                                                   float(rng.uniform(h * .3, h * .7))], "label": 1}
                try:
                    t, r = _timed(c, sid, body)
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        times.append(t)
                    elif r.status_code != 503:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"case": "load", "clients": clients, "prompts_each": prompts, "status_codes": codes,
            "errors": errors[:5], "n_errors": len(errors), "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95),
            "wall_s": round(wall, 2), "answered_per_s": round(len(times) / wall, 1)}


def corrupt_burst(url: str, headers: dict, image: Path, n: int) -> dict:
    codes: dict[int, int] = {}
    lock = threading.Lock()
    payloads = [(b"\x89PNG\r\n\x1a\n" + os.urandom(2000), "broken.png"), (os.urandom(5000), "x.nii.gz"),
                (b"PK\x03\x04" + os.urandom(300), "series.zip"), (os.urandom(3000), "scan.dcm")]

    def send(i: int) -> None:
        data, name = payloads[i % len(payloads)]
        with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
            r = c.post("/api/sessions", params={"filename": name}, content=data)
        with lock:
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        info = _open(c, image)
        h, w = info["shape"][1:]
        ok = c.post(f"/api/sessions/{info['id']}/segment", json={"box": [w * .25, h * .25, w * .75, h * .75]})
    return {"case": "corrupt", "uploads": n, "status_codes": codes, "answers_after": ok.status_code == 200}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--clicks", type=int, default=30)
    ap.add_argument("--slices", type=int, default=5)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--corrupt", type=int, default=40)
    ap.add_argument("--max-inflight", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, few requests: the smoke test")
    args = ap.parse_args()
    if args.quick:
        args.model, args.clicks, args.slices, args.clients, args.prompts, args.corrupt = "tiny_vit_test", 3, 1, 3, 2, 4
    image, volume = _images(args.quick)
    port, token = _free_port(), "bench-token"
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "server.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "imedsam.cli", "serve", "--port", str(port), "--model",
                                   args.model, "--token", token, "--max-inflight", str(args.max_inflight),
                                   "--max-queue", str(args.max_queue)], stdout=log, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/api/health", headers=headers, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise SystemExit(f"server did not start:\n{log.read()}")
                time.sleep(0.2)
            from imedsam.runtime import cpu_precision

            cal = cpu_precision()
            print(json.dumps({"case": "machine", "model": args.model, "threads": os.cpu_count(),
                              "auto_precision": cal.choice, "calibration_fp32_gflops": cal.fp32_gflops,
                              "calibration_bf16_gflops": cal.bf16_gflops, "max_inflight": args.max_inflight,
                              "max_queue": args.max_queue}), flush=True)
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                print(json.dumps(latency(client, image, volume, args.clicks, args.slices, args.seed)), flush=True)
            print(json.dumps(load(url, headers, image, args.clients, args.prompts, args.seed)), flush=True)
            print(json.dumps(corrupt_burst(url, headers, image, args.corrupt)), flush=True)
            print(json.dumps({"case": "server", "peak_rss_mb": _peak_rss_mb(server.pid)}), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
