"""Evaluation reports: ``cases.csv``, ``summary.json`` and a self-contained ``report.html``.

``write_report`` writes, into one folder (created if needed, every file atomically):

* ``cases.csv``: one row per evaluated case (or case x grid), columns: the id column, then the metric columns of
  :data:`imedsam.evaluate.metrics.METRIC_KEYS` present, then every other field in first-seen order. NaN is written
  as ``nan`` and ``None`` as an empty cell.
* ``summary.json``: per-metric mean/std/median/min/max and counts (:func:`imedsam.evaluate.metrics.summarize`),
  the best/median/worst case ids by Dice, the sweep, the resolved protocol/config, the metric conventions, the
  imedsam version and a UTC time stamp. Strict JSON (NaN becomes ``null``).
* ``report.html``: one file with inline base64 PNGs: ground-truth (green) vs prediction (red) contour overlays for
  the best/median/worst cases by Dice, a Dice histogram, a "Dice vs output size" plot when a sweep is given, the
  summary table and the protocol/conventions text.

Figures use matplotlib's Agg backend (no display needed); the global backend is not changed.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imedsam.errors import ImedsamError
from imedsam.evaluate.metrics import METRIC_KEYS, summarize
from imedsam.io.atomic import atomic_write

logger = logging.getLogger(__name__)

GT_COLOR = "#00c000"  # ground-truth contour (green)
PRED_COLOR = "#ff2020"  # prediction contour (red)

Overlay = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image (H,W,3) or (H,W), gt (H,W) bool, pred (H,W) bool)


# ----------------------------------------------------------------------------------------------- selection


def _id_of(row: Mapping[str, Any], id_key: str) -> str:
    if id_key in row:
        return str(row[id_key])
    for alt in ("case", "case_id", "id"):
        if alt in row:
            return str(row[alt])
    raise ImedsamError(f"a row has no {id_key!r} column (keys: {sorted(row)}); give every row a case id")


def _value(v: Any) -> float:
    if v is None or isinstance(v, (bool, str)):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def select_cases(rows: Sequence[Mapping[str, Any]], key: str = "dice", *, id_key: str = "case") -> dict[str, str]:
    """Best, median and worst case ids by ``key`` (larger is better, as for Dice).

    Rows whose ``key`` is NaN/None are skipped. Ties keep the rows' order. The median is the lower median of the
    sorted values (an actual case, never an average of two).

    Returns:
        ``{"best": id, "median": id, "worst": id}``.
    """
    scored = [(_value(r.get(key)), i, _id_of(r, id_key)) for i, r in enumerate(rows)]
    scored = [s for s in scored if math.isfinite(s[0])]
    if not scored:
        raise ImedsamError(f"no row has a finite {key!r} value; cannot select best/median/worst cases")
    ascending = sorted(scored, key=lambda s: (s[0], s[1]))
    return {"best": max(scored, key=lambda s: (s[0], -s[1]))[2],
            "median": ascending[(len(ascending) - 1) // 2][2],
            "worst": ascending[0][2]}


# ----------------------------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    """Recursively turn ``obj`` into strict-JSON data: NaN/inf -> None, numpy -> Python, paths/others -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "model_dump"):  # pydantic
        return _jsonable(obj.model_dump())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def _columns(rows: Sequence[Mapping[str, Any]], id_key: str) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.append(k)
    id_col = id_key if id_key in seen else next((a for a in ("case", "case_id", "id") if a in seen), id_key)
    metrics = [k for k in METRIC_KEYS if k in seen]
    return [id_col] + metrics + [k for k in seen if k != id_col and k not in metrics]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return "nan" if math.isnan(f) else repr(f)
    return str(v)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(figsize):
    """A figure bound to an Agg canvas, independent of pyplot's global backend and figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _as_rgb(image: Any, name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ImedsamError(f"overlays[{name!r}] image has shape {img.shape}; give (H, W, 3) RGB or (H, W) grey")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float64)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if lo >= 0.0 and hi <= 1.0:
        return (img * 255).round().astype(np.uint8)
    if hi > lo:
        img = (img - lo) / (hi - lo) * 255
    return np.clip(np.nan_to_num(img), 0, 255).round().astype(np.uint8)


def overlay_png(image: Any, gt: Any, pred: Any, *, title: str = "", name: str = "overlay") -> str:
    """Base64 PNG of ``image`` with the ground-truth contour (green) and the prediction contour (red).

    Args:
        image: ``(H, W, 3)`` RGB (uint8, or floats in [0, 1] or any range, min-max scaled) or ``(H, W)`` grey.
        gt, pred: ``(H, W)`` binary masks on the image's grid.
    """
    rgb = _as_rgb(image, name)
    g, p = np.asarray(gt).astype(bool), np.asarray(pred).astype(bool)
    if g.shape != rgb.shape[:2] or p.shape != rgb.shape[:2]:
        raise ImedsamError(f"overlays[{name!r}]: image {rgb.shape[:2]}, gt {g.shape} and pred {p.shape} differ; "
                           "give the masks on the image's grid")
    h, w = g.shape
    scale = 4.0 / max(h, w)
    fig = _figure((max(w * scale, 1.5), max(h * scale, 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb, interpolation="nearest")
    for mask, color in ((g, GT_COLOR), (p, PRED_COLOR)):
        if mask.any():  # padded so that contours touching the image border close; row/col = pixel centre
            ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), np.pad(mask, 1).astype(np.float32),
                       levels=[0.5], colors=[color], linewidths=1.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return _png_b64(fig)


def _histogram_png(values: np.ndarray, key: str) -> str:
    fig = _figure((5, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(values, bins=np.linspace(0.0, 1.0, 21), color="#4878d0", edgecolor="white")
    ax.set_xlim(0, 1)
    ax.set_xlabel(key)
    ax.set_ylabel("cases")
    ax.set_title(f"{key} distribution (n={values.size})")
    return _png_b64(fig)


def _sweep_png(sweep: Mapping[int, float], key: str) -> str:
    xs = sorted(sweep)
    ys = [_value(sweep[x]) for x in xs]
    fig = _figure((5, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o", color="#d65f5f")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=7)
    ax.set_xlabel("output size (pixels per side)")
    ax.set_ylabel(f"mean {key}")
    ax.set_title(f"{key} vs output size")
    ax.grid(True, alpha=0.3)
    return _png_b64(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt, quote=True)}">'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.k,th.k{text-align:left}.cases{display:flex;gap:1em;flex-wrap:wrap}
figure{margin:0}figcaption{font-size:0.85em;text-align:center}pre{background:#f7f7f7;padding:1em;overflow:auto}
.legend span{display:inline-block;width:1em;height:0.3em;vertical-align:middle;margin:0 0.3em}
"""


# ----------------------------------------------------------------------------------------------- report


def write_report(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, config: Mapping[str, Any],
                 conventions: Mapping[str, Any], overlays: Mapping[str, Overlay] | None = None,
                 sweep: Mapping[int, float] | None = None, title: str = "imedsam evaluation report",
                 id_key: str = "case", key: str = "dice", group_by: str | None = None,
                 headline: Mapping[str, Any] | None = None,
                 selected: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``cases.csv``, ``summary.json`` and ``report.html`` into ``out_dir`` (created; atomic writes).

    Args:
        out_dir: output folder.
        rows: one dict per case: an id (``id_key``, default ``"case"``; ``"case_id"``/``"id"`` also accepted),
            metric columns (:func:`imedsam.evaluate.metrics.binary_metrics`) and any extra fields.
        config: the resolved protocol/config (written to ``summary.json`` and the HTML); any JSON-able data,
            pydantic models and dataclasses included (others are written as strings).
        conventions: the metric conventions (:func:`imedsam.evaluate.metrics.conventions`).
        overlays: ``{case id: (image, gt, pred)}`` with ``image`` ``(H, W, 3)`` RGB or ``(H, W)`` grey and ``gt``,
            ``pred`` ``(H, W)`` binary masks on the image grid (pick a slice for volumes). The best/median/worst
            cases by ``key`` that have an entry are drawn (GT contour green, prediction red).
        sweep: ``{output size: mean Dice}`` for the "Dice vs output size" plot (e.g. a cross-resolution sweep).
        title: the HTML title.
        key: the metric used for case selection and the histogram.
        group_by: a column (e.g. ``"gt_components"``); when the rows carry it, ``summary.json`` gets the
            statistics per value of that column under ``"groups"`` and the HTML a table of ``key`` per group.
        headline: figures of the protocol beyond the per-case statistics (e.g. the per-image mean Dice, the Dice
            after each click, NoC), written under ``"headline"`` and listed at the top of the HTML.
        selected: ``{"best": id, "median": id, "worst": id}`` to draw; default :func:`select_cases` on ``rows``
            (give it when the overlays were computed for a selection made on a subset, e.g. one output grid).

    Returns:
        ``{"csv": path, "json": path, "html": path}``.
    """
    if not rows:
        raise ImedsamError("rows is empty; evaluate at least one case before writing a report")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ImedsamError(f"out_dir {out} is a file; give a folder for the report")
    rows = [dict(r) for r in rows]
    for r in rows:
        _id_of(r, id_key)  # every row must carry an id
    columns = _columns(rows, id_key)
    id_col = columns[0]
    if id_col != id_key and id_col not in ("case", "case_id", "id"):
        raise ImedsamError(f"rows have no {id_key!r} column; give every row a case id")

    summary_metrics = summarize(rows)
    if selected is None:
        try:
            selected = select_cases(rows, key, id_key=id_col)
        except ImedsamError:
            selected = None
        logger.warning("no finite %r in the rows: no best/median/worst selection", key)
    if sweep is not None:
        sweep = {int(k): v for k, v in sweep.items()}

    from imedsam import __version__

    summary = _jsonable({
        "title": title,
        "imedsam_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_cases": len(rows),
        "metrics": summary_metrics,
        "selected_by": key,
        "selected": selected,
        "sweep": {str(k): sweep[k] for k in sorted(sweep)} if sweep is not None else None,
        "groups": _groups(rows, group_by),
        "headline": dict(headline or {}),
        "config": config,
        "conventions": conventions,
    })

    paths: dict[str, Path] = {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in columns])
    paths["csv"] = _write_text(out / "cases.csv", buf.getvalue())
    paths["json"] = _write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")

    html_text = _render_html(rows, id_col=id_col, key=key, title=title, summary=summary, selected=selected,
                             overlays=overlays, sweep=sweep)
    paths["html"] = _write_text(out / "report.html", html_text)
    logger.info("report written to %s (%d cases)", out, len(rows))
    return paths


def _groups(rows: Sequence[Mapping[str, Any]], column: str | None) -> dict[str, Any] | None:
    """``{"by": column, "values": {value: summarize(rows with that value)}}``, or None without the column."""
    if column is None or not any(column in r for r in rows):
        return None
    def order(v: Any) -> tuple:  # numbers in numeric order first, then the other values by their text
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (0, v, "") if number else (1, 0, str(v))

    values = sorted({r.get(column) for r in rows}, key=order)
    return {"by": column,
            "values": {str(v): summarize([r for r in rows if r.get(column) == v]) for v in values}}


def _render_html(rows, *, id_col, key, title, summary, selected, overlays, sweep) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{summary['n_cases']} cases &middot; imedsam {esc(str(summary['imedsam_version']))} &middot; "
             f"{esc(str(summary['created_utc']))}</p>"]

    parts.append("<h2>Summary</h2>")
    if summary.get("headline"):
        parts.append("<ul>" + "".join(f"<li>{esc(str(k))}: {esc(json.dumps(v))}</li>"
                                      for k, v in summary["headline"].items()) + "</ul>")
    parts.append('<table><tr><th class="k">metric</th><th>mean</th><th>std</th><th>median</th><th>min</th>'
                 "<th>max</th><th>n valid</th><th>n NaN (excluded)</th></tr>")
    for name, s in summary["metrics"].items():
        parts.append(f'<tr><td class="k">{esc(name)}</td>' + "".join(
            f"<td>{_fmt(s.get(c))}</td>" for c in ("mean", "std", "median", "min", "max", "n_valid", "n_nan"))
            + "</tr>")
    parts.append("</table>")

    groups = summary.get("groups")
    if groups:
        parts.append(f"<h2>{esc(key)} by {esc(groups['by'])}</h2>")
        parts.append(f'<table><tr><th class="k">{esc(groups["by"])}</th><th>cases</th><th>mean</th>'
                     "<th>median</th><th>min</th></tr>")
        for value, stats in groups["values"].items():
            st = stats.get(key, {})
            parts.append(f'<tr><td class="k">{esc(value)}</td><td>{st.get("n", 0)}</td>' + "".join(
                f"<td>{_fmt(st.get(c))}</td>" for c in ("mean", "median", "min")) + "</tr>")
        parts.append("</table>")

    parts.append(f"<h2>Cases: best, median and worst by {esc(key)}</h2>")
    parts.append(f'<p class="legend"><span style="background:{GT_COLOR}"></span>ground truth '
                 f'<span style="background:{PRED_COLOR}"></span>prediction</p>')
    if selected is None:
        parts.append(f"<p>No case has a finite {esc(key)}.</p>")
    else:
        by_id = {}
        for r in rows:
            by_id.setdefault(str(r[id_col]), r)
        figs = []
        for label in ("best", "median", "worst"):
            cid = selected[label]
            v = _value(by_id[cid].get(key))
            caption = f"{label}: {cid} ({key} {v:.4f})"
            if overlays and cid in overlays:
                image, gt, pred = overlays[cid]
                b64 = overlay_png(image, gt, pred, name=cid)
                figs.append(f"<figure>{_img(b64, caption)}<figcaption>{esc(caption)}</figcaption></figure>")
            else:
                figs.append(f"<figure><figcaption>{esc(caption)} &mdash; no overlay given</figcaption></figure>")
        parts.append('<div class="cases">' + "".join(figs) + "</div>")

    values = np.asarray([_value(r.get(key)) for r in rows], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size:
        parts.append(f"<h2>{esc(key)} distribution</h2>")
        parts.append(_img(_histogram_png(values, key), f"{key} histogram"))
    if sweep:
        parts.append(f"<h2>{esc(key)} vs output size</h2>")
        parts.append(_img(_sweep_png(sweep, key), f"{key} vs output size"))
        parts.append('<table><tr><th>output size</th><th>' + esc(key) + "</th></tr>" + "".join(
            f"<tr><td>{int(s)}</td><td>{_fmt(_value(sweep[s]))}</td></tr>" for s in sorted(sweep)) + "</table>")

    parts.append("<h2>Metric conventions</h2>")
    parts.append('<table><tr><th class="k">item</th><th class="k">convention</th></tr>')
    for k, v in (summary["conventions"] or {}).items():
        parts.append(f'<tr><td class="k">{esc(str(k))}</td><td class="k">{esc(str(v))}</td></tr>')
    parts.append("</table>")
    parts.append("<h2>Protocol and configuration</h2>")
    parts.append(f"<pre>{esc(json.dumps(summary['config'], indent=2))}</pre>")
    parts.append("<p>Per-case values: <code>cases.csv</code>; statistics: <code>summary.json</code>.</p>")
    parts.extend(["</body>", "</html>", ""])
    return "\n".join(parts)
