"""`imedsam serve` from the command line: refusals before any model loads, and a real server process driven by
the load benchmark's smoke mode (token, uploads, prompts, concurrent clients, corrupt uploads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imedsam.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, needle", [
    (["--port", "70000"], "--port 70000"),
    (["--adapter", "/nonexistent/run"], "--adapter"),
    (["--runs", "/nonexistent/runs"], "--runs /nonexistent/runs: not a folder"),
    (["--max-inflight", "0"], "--max-inflight: must be at least 1"),
    (["--token", " "], "--token: must not be empty"),
    (["--model", "nomodel"], "nomodel"),
])
def test_bad_arguments_exit_2_in_one_line(capsys, monkeypatch, argv, needle):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_runs_folder_offers_complete_runs_by_name(tmp_path):
    from imedsam.serve import ServeSettings
    from imedsam.serve.models import ModelCatalog

    (tmp_path / "half-done").mkdir()  # no adapter file: not offered
    catalog = ModelCatalog(ServeSettings(model="tiny_vit_test", runs=tmp_path))
    assert list(catalog.entries) == ["tiny_vit_test"]
    with pytest.raises(Exception, match="not offered"):
        catalog.entry(str(tmp_path / "half-done"))


def test_server_process_under_load_and_corrupt_uploads():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows["latency"]["click_p50_ms"] > 0
    load = rows["load"]
    assert load["n_errors"] == 0 and sum(load["status_codes"].values()) == load["clients"] * load["prompts_each"]
    assert set(rows["corrupt"]["status_codes"]) == {"400"} and rows["corrupt"]["answers_after"] is True
    assert rows["server"]["peak_rss_mb"] > 0
