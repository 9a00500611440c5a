"""Streaming memory: `imedsam segment` of a full-size CT volume (512 x 512 x 300, int16, .nii.gz) from a 3-D box
over 20 slices stays within 4 GB of peak RSS and shows a progress bar. The model is the random 4-block test ViT,
so the figure is the volume pipeline's (read, intensity mapping, slice loop, label write), not a model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

#: what the segment run may use at its peak (resident set, the whole process: Python, torch, the volume)
PEAK_RSS_LIMIT_GB = 4.0

#: runs `imedsam segment` in this process and prints its own peak RSS (kB) as the last line: the memory map's
#: high-water mark (VmHWM); ru_maxrss is not used, Linux carries the forking parent's (pytest's) peak into it
_RUNNER = ("import json, re, sys\n"
           "from pathlib import Path\n"
           "from imedsam.cli import main\n"
           "rc = main(sys.argv[1:])\n"
           "hwm = int(re.search(r'VmHWM:\\s*(\\d+) kB', Path('/proc/self/status').read_text()).group(1))\n"
           "print(json.dumps({'rc': rc, 'peak_rss_kb': hwm}))\n")


def _write_ct(path: Path, shape_ijk=(512, 512, 300)) -> None:
    """A synthetic int16 CT (HU) in the file's (i, j, k) order: air around a water-density body with a denser
    'organ'; smooth, so that it compresses and writes fast."""
    i, j, k = (np.arange(n, dtype=np.int32) for n in shape_ijk)
    r2 = (i[:, None] - 256) ** 2 + (j[None, :] - 256) ** 2
    plane = np.where(r2 < 200 ** 2, 0, -1000).astype(np.int16)  # body disc
    plane[(i[:, None] - 250) ** 2 + (j[None, :] - 240) ** 2 < 60 ** 2] = 60  # organ
    data = np.empty(shape_ijk, np.int16)
    for z in k:
        data[:, :, z] = plane + np.int16(z % 8)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.5, 1.0])), str(path))


def test_segment_full_size_ct_from_a_3d_box_stays_under_4_gb(tmp_path):
    image = tmp_path / "ct.nii.gz"
    _write_ct(image)
    out = tmp_path / "labels.nii.gz"
    argv = ["segment", str(image), "--box3d", "180", "170", "140", "330", "320", "160", "--model", "tiny_vit_test",
            "--device", "cpu", "--precision", "fp32", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", _RUNNER, *argv], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    summary, usage = json.loads(lines[-2]), json.loads(lines[-1])
    assert usage["rc"] == 0
    peak_gb = usage["peak_rss_kb"] / 1024 ** 2
    assert peak_gb < PEAK_RSS_LIMIT_GB, f"peak RSS {peak_gb:.2f} GB"
    assert "segment" in done.stderr and "/20" in done.stderr  # the progress bar over the 20 prompted slices
    written = nib.load(str(out))
    assert written.shape == (512, 512, 300) and summary["axis"] == "k"
    assert np.asarray(written.dataobj)[:, :, :140].max() == 0  # nothing outside the prompted slices
    print(f"peak RSS {peak_gb:.2f} GB")
