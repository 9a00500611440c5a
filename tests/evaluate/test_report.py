"""Report files exist, parse, and carry the conventions, summary and figures."""

from __future__ import annotations

import base64
import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

import imedsam
from imedsam.errors import ImedsamError
from imedsam.evaluate.metrics import binary_metrics, conventions, summarize
from imedsam.evaluate.report import overlay_png, select_cases, write_report


def disc(n: int, r: float, cy: float, cx: float) -> np.ndarray:
    y, x = np.mgrid[:n, :n]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


class _Collector(HTMLParser):
    """Collects img sources and visible text; checks tags are balanced for the elements we open."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def cases():
    n = 40
    gt = disc(n, 10, 20, 20)
    preds = {"good": disc(n, 10, 20, 21), "mid": disc(n, 8, 22, 20), "bad": disc(n, 5, 10, 28),
             "miss": np.zeros((n, n), bool)}
    rows = []
    for i, (cid, pred) in enumerate(preds.items()):
        rows.append({"case": cid, **binary_metrics(pred, gt), "grid": f"{n}x{n}", "note": f"row, {i}"})
    image = np.stack([np.linspace(0, 1, n * n).reshape(n, n)] * 3, axis=-1)
    overlays = {cid: (image, gt, pred) for cid, pred in preds.items()}
    return rows, overlays


def test_select_cases(cases):
    rows, _ = cases
    sel = select_cases(rows)
    assert sel == {"best": "good", "median": "bad", "worst": "miss"}  # lower median of 4
    assert select_cases(rows, "hd")["worst"] == "good"  # NaN of "miss" skipped; smallest HD = "worst" by value
    with pytest.raises(ImedsamError, match="finite"):
        select_cases([{"case": "a", "dice": float("nan")}])


def test_write_report_files_parse(tmp_path, cases):
    rows, overlays = cases
    conv = conventions(nsd_tolerance=2.0)
    out = tmp_path / "new" / "report"
    paths = write_report(out, rows, config={"model": "imedsam", "size": (384, 384), "path": tmp_path},
                         conventions=conv, overlays=overlays, sweep={128: 0.81, 384: 0.9, 896: 0.85},
                         title="test <report>")
    assert set(paths) == {"csv", "json", "html"}
    assert all(p.exists() and p.parent == out for p in paths.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    with open(paths["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["case"] for r in table] == ["good", "mid", "bad", "miss"]
    assert list(table[0])[:6] == ["case", "dice", "iou", "hd95", "hd", "nsd"]
    assert float(table[0]["dice"]) == pytest.approx(rows[0]["dice"])
    assert math.isnan(float(table[3]["hd"])) and table[2]["note"] == "row, 2"

    summary = json.loads(paths["json"].read_text())
    assert summary["imedsam_version"] == imedsam.__version__
    assert summary["n_cases"] == 4
    assert summary["metrics"]["hd"]["n_nan"] == 1
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(summarize(rows)["dice"]["mean"])
    assert summary["conventions"] == conv
    assert summary["config"]["size"] == [384, 384] and summary["config"]["path"] == str(tmp_path)
    assert summary["selected"] == {"best": "good", "median": "bad", "worst": "miss"}  # lower median of 4
    assert summary["sweep"] == {"128": 0.81, "384": 0.9, "896": 0.85}

    text = paths["html"].read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    # 3 overlays + histogram + sweep plot, all inline PNGs
    assert len(parser.imgs) == 5
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    visible = " ".join(parser.text)
    assert conv["hd95"] in visible and conv["empty_one"] in visible
    assert "test <report>" in visible  # escaped in the source, intact as text
    assert "test <report>" not in text
    assert "best: good" in visible and "worst: miss" in visible


def test_report_without_overlays_or_sweep(tmp_path):
    rows = [{"case_id": "a", "dice": 0.5, "hd": 2.0}, {"case_id": "b", "dice": None, "hd": float("nan")}]
    paths = write_report(tmp_path, rows, config={}, conventions=conventions(), overlays=None)
    parser = _Collector()
    parser.feed(paths["html"].read_text())
    assert len(parser.imgs) == 1  # histogram only
    assert "no overlay given" in " ".join(parser.text)
    with open(paths["csv"], newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["case_id", "dice", "hd"] and table[2] == ["b", "", "nan"]
    summary = json.loads(paths["json"].read_text())
    assert summary["metrics"]["dice"]["n_nan"] == 1


def test_overlay_png_and_errors(tmp_path):
    gt = disc(24, 6, 12, 12)
    png = base64.b64decode(overlay_png(np.zeros((24, 24), np.uint8), gt, np.ones((24, 24), bool)))
    assert png[:4] == b"\x89PNG"
    with pytest.raises(ImedsamError, match="grid"):
        overlay_png(np.zeros((24, 24, 3)), gt, np.zeros((20, 20), bool))
    with pytest.raises(ImedsamError, match="rows is empty"):
        write_report(tmp_path, [], config={}, conventions={})
    with pytest.raises(ImedsamError, match="case id"):
        write_report(tmp_path, [{"dice": 1.0}], config={}, conventions={})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImedsamError, match="is a file"):
        write_report(tmp_path / "file", [{"case": "a", "dice": 1.0}], config={}, conventions={})


def test_report_groups_scores_by_a_column(tmp_path):
    rows = [{"case": "a", "dice": 0.9, "gt_components": 1}, {"case": "b", "dice": 0.7, "gt_components": 1},
            {"case": "c", "dice": 0.2, "gt_components": 2}, {"case": "d", "dice": 0.4, "gt_components": 10}]
    paths = write_report(tmp_path, rows, config={}, conventions=conventions(), group_by="gt_components")
    groups = json.loads(paths["json"].read_text())["groups"]
    assert groups["by"] == "gt_components"
    assert list(groups["values"]) == ["1", "2", "10"]  # numeric order, not string order
    assert groups["values"]["1"]["dice"]["mean"] == pytest.approx(0.8)
    assert groups["values"]["1"]["dice"]["n"] == 2 and groups["values"]["2"]["dice"]["mean"] == pytest.approx(0.2)
    parser = _Collector()
    parser.feed(paths["html"].read_text())
    assert "dice by gt_components" in parser.text
    without = write_report(tmp_path / "plain", rows, config={}, conventions=conventions())
    assert json.loads(without["json"].read_text())["groups"] is None
