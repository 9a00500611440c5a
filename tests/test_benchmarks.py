"""The benchmark scripts import only what exists: every `from imedsam... import name` in benchmarks/*.py (function
level included) names a real module and attribute, so a refactor cannot silently break a benchmark."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_imports_resolve(script: Path) -> None:
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imedsam"):
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                missing.append(f"{node.module} ({exc})")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    assert not missing, f"{script.name}: " + "; ".join(missing)


LA_MRI = Path(__file__).resolve().parents[2] / "shared" / "data" / "la-mri"
LA_METHODS = ("ma_sam_auto", "ma_sam_auto_lcc", "ma_sam_auto_lcc_tta", "ma_sam_triplanar", "ma_sam_triplanar_lcc",
              "ma_sam_triplanar_k_lcc", "ma_sam_box3d", "ma_sam_box3d_lcc", "ma_sam_box3d_lcc_tta", "litemedsam_box",
              "litemedsam_propagate", "imedsam_box")


@pytest.mark.skipif(not LA_MRI.is_dir(), reason=f"{LA_MRI} not found (the real LA MRI volumes)")
def test_la_mri_benchmark_quick_rows(tmp_path: Path) -> None:
    """`benchmarks/la_mri.py --quick --totalseg` end to end (a few training steps at 64 px on cropped volumes):
    every method has a line with a finite Dice in [0, 1] and its per-volume lines, or a stated reason; every line
    carries its protocol, the CPU facts and the --quick warning."""
    import json
    import math
    import subprocess
    import sys

    import yaml

    script = BENCHMARKS[0].parent / "la_mri.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--totalseg", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and all(line["quick"] is True and "meaningless" in line["note"] for line in lines)
    assert all(line["cpu"]["auto_precision"] in ("fp32", "bf16") for line in lines)
    methods = {line["method"]: line for line in lines if line["row"] == "method"}
    assert set(methods) == set(LA_METHODS)
    for name, line in methods.items():
        protocol = line["protocol"]
        assert {"split", "prompt", "metrics", "resolution", "precision", "intensity"} <= set(protocol), name
        if "skipped" in line:
            assert isinstance(line["skipped"], str) and len(line["skipped"]) > 20, name
            continue
        assert math.isfinite(line["dice"]) and 0.0 <= line["dice"] <= 1.0, name
        volumes = [v for v in lines if v["row"] == "volume" and v["method"] == name]
        assert len(volumes) == line["volumes"] == 2 and all(0.0 <= v["dice"] <= 1.0 for v in volumes), name
        assert all(v["protocol"] == protocol for v in volumes)
    for name in (*(m for m in LA_METHODS if m.startswith("ma_sam")), "litemedsam_box",
                 "litemedsam_propagate"):  # these always run
        assert "skipped" not in methods[name], methods[name]
    assert "3-D box per scan" in methods["ma_sam_box3d"]["protocol"]["prompt"]
    assert "largest 3-D connected component" in methods["ma_sam_auto_lcc"]["protocol"]["post_processing"]
    lcc = json.loads((Path(methods["ma_sam_auto_lcc"]["report"]).parent / "summary.json").read_text())
    assert lcc["config"]["largest_component"] is True
    for name in ("ma_sam_auto_lcc_tta", "ma_sam_box3d_lcc_tta"):
        tta = json.loads((Path(methods[name]["report"]).parent / "summary.json").read_text())
        assert tta["config"]["tta"] == "id,h,v" and tta["config"]["largest_component"] is True, name
    for name, axes in (("ma_sam_triplanar_lcc", "k,j,i"), ("ma_sam_triplanar_k_lcc", "k")):
        tri = json.loads((Path(methods[name]["report"]).parent / "summary.json").read_text())
        assert tri["config"]["stack_axes"] == axes and tri["config"]["largest_component"] is True, name
    box_lcc = json.loads((Path(methods["ma_sam_box3d_lcc"]["report"]).parent / "summary.json").read_text())
    assert box_lcc["config"]["prompt"] == "box3d" and box_lcc["config"]["largest_component"] is True
    assert "percentiles" in methods["litemedsam_box"]["protocol"]["intensity"]  # LGE-MRI: not CT
    for name in ("ma_sam_auto", "ma_sam_box3d"):
        train = next(line for line in lines if line["row"] == "train" and line["method"] == name)
        assert train["steps"] == 2 and train["budget_minutes"] == 1.0, name
    box_run = next(line for line in lines if line["row"] == "train" and line["method"] == "ma_sam_box3d")["run"]
    box_config = yaml.safe_load((Path(box_run) / "config.yaml").read_text())
    assert box_config["model"]["decoder"]["prompt"] == "box"
    auto_run = next(line for line in lines if line["row"] == "train" and line["method"] == "ma_sam_auto")["run"]
    assert box_config["run"]["init_from"] == auto_run  # fine-tuned from the automatic run (--box3d-init auto)
    assert "fine-tuned from the ma_sam_auto run" in methods["ma_sam_box3d"]["protocol"]["training"]
    smoke = next(line for line in lines if line["row"] == "smoke")
    assert smoke["classes"] == 41 and 0.0 <= smoke["dice_mean_over_classes"] <= 1.0
    assert "soft_tissue" in smoke["intensity"]  # the example CT, declared CT in its dataset.json
    assert (tmp_path / "results.jsonl").read_text().count("\n") == len(lines)
