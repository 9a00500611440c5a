"""Segmentation metrics with explicit conventions: Dice, IoU, HD95, HD (max) and NSD, spacing-aware.

Functional core (:func:`binary_metrics`, :func:`multiclass_metrics`, :func:`summarize`) plus a thin accumulating
class (:class:`MetricAccumulator`). The conventions below are also returned by :func:`conventions` so that every
report states them next to its numbers.

Conventions
-----------
* **Inputs.** Binary masks of shape ``(H, W)`` or ``(D, H, W)`` (bool, or integers/floats holding only 0 and 1),
  prediction and ground truth on the same grid. ``spacing`` is given in the **array-axis order** (``(sy, sx)`` or
  ``(sz, sy, sx)``), not in NIfTI/ITK ``(x, y, z)`` order.
* **Units.** Distances (HD, HD95, NSD tolerance) are in **mm** (physical units of ``spacing``) when a spacing is
  given, otherwise in **pixels/voxels of the evaluation grid** (unit spacing). Pixel distances measured on
  different grids are not comparable (systems.md F-15).
* **Surface.** MONAI's edge definition (``monai.metrics.utils.get_mask_edges`` without sub-voxels): the foreground
  voxels with at least one face-connected (4-/6-neighbour) background neighbour, i.e. ``mask XOR erosion(mask)``
  with scipy's default cross structuring element; voxels on the image border count as surface. Distances are
  exact Euclidean distances between surface-voxel centres (MONAI ``distance_metric="euclidean"``).
* **HD** (Hausdorff): ``max(max d(P->G), max d(G->P))`` over the directed surface distances.
* **HD95**: MONAI's ``compute_hausdorff_distance(..., percentile=95)`` convention: the **maximum of the two
  directed 95th percentiles**, ``max(q95(d(P->G)), q95(d(G->P)))``, with ``torch.quantile``'s linear
  interpolation. This is not the 95th percentile of the pooled distances (medpy's ``hd95``), which can differ
  slightly.
* **NSD** (normalised surface distance / surface Dice at tolerance ``tau``): MONAI's
  ``compute_surface_dice(use_subvoxels=False)``: ``(#{d(P->G) <= tau} + #{d(G->P) <= tau}) / (|dP| + |dG|)``,
  counting surface voxels (not surface areas).
* **Dice** ``= 2|P&G| / (|P| + |G|)``; **IoU** ``= |P&G| / |P|G|`` (identical to MONAI ``compute_dice`` /
  ``compute_iou`` on one-hot inputs).
* **Empty masks** (explicit policy, never NaN-poisoned means):

  - both empty: dice 1, iou 1, hd 0, hd95 0, nsd 1 (a correct "nothing here" answer);
  - exactly one empty: dice 0, iou 0, nsd 0, and hd/hd95 **undefined**: ``NaN`` by default
    (``empty_policy="nan"``), which :func:`summarize` excludes from mean/std/median and counts in ``n_nan``;
    or ``empty_policy="diagonal"``: the diagonal of the grid in the distance unit (a worst-case sentinel);
    or a finite number ``>= 0`` used as the sentinel (e.g. ``100`` reproduces I-MedSAM's medpy wrapper).

Distances are computed once per case (MONAI's ``get_edge_surface_distance``, symmetric) and HD, HD95 and NSD are
derived from the same two directed distance sets exactly as MONAI's public functions do; a test checks parity with
``compute_hausdorff_distance`` and ``compute_surface_dice``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

#: The metric columns :func:`binary_metrics` returns, in report order.
METRIC_KEYS: tuple[str, ...] = ("dice", "iou", "hd95", "hd", "nsd")
#: Metrics where larger is better (the others are distances: smaller is better).
HIGHER_IS_BETTER: dict[str, bool] = {"dice": True, "iou": True, "hd95": False, "hd": False, "nsd": True}

EmptyPolicy = str | float


def _check_policy(empty_policy: EmptyPolicy) -> None:
    if isinstance(empty_policy, str):
        if empty_policy not in ("nan", "diagonal"):
            raise ImedsamError(f"empty_policy={empty_policy!r} is not known; use 'nan', 'diagonal' or a number >= 0")
        return
    if isinstance(empty_policy, bool) or not isinstance(empty_policy, (int, float)) or not math.isfinite(
            empty_policy) or empty_policy < 0:
        raise ImedsamError(f"empty_policy={empty_policy!r} is invalid; use 'nan', 'diagonal' or a finite number >= 0")


def _check_tolerance(nsd_tolerance: float) -> float:
    try:
        tol = float(nsd_tolerance)
    except (TypeError, ValueError):
        tol = float("nan")
    if not math.isfinite(tol) or tol < 0:
        raise ImedsamError(f"nsd_tolerance={nsd_tolerance!r} is invalid; give a finite distance >= 0 "
                           "(mm with spacing, pixels without)")
    return tol


def _as_mask(a: Any, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim not in (2, 3):
        raise ImedsamError(f"{name} has shape {arr.shape}; give a binary mask of shape (H, W) or (D, H, W)")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImedsamError(f"{name} has dtype {arr.dtype}; give a bool mask (or 0/1 numbers)")
    if not np.all((arr == 0) | (arr == 1)):
        raise ImedsamError(f"{name} holds values other than 0 and 1; threshold it (e.g. probs > 0.5) first")
    return arr.astype(bool)


def _check_spacing(spacing: Any, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        values = (float(spacing),) * ndim
    else:
        try:
            values = tuple(float(s) for s in spacing)
        except (TypeError, ValueError) as exc:
            raise ImedsamError(f"spacing={spacing!r} is not a sequence of numbers; give one positive number per "
                               "array axis") from exc
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise ImedsamError(f"spacing={spacing!r} does not fit a {ndim}-D mask; give {ndim} positive numbers in "
                           "array-axis order")
    return values


def conventions(*, spacing: Sequence[float] | None = None, nsd_tolerance: float = 2.0,
                empty_policy: EmptyPolicy = "nan") -> dict[str, str]:
    """The metric conventions as human-readable strings, for reports (``summary.json``, ``report.html``).

    Args:
        spacing: the spacing used (any non-None value means distances are in mm), or None for pixels.
        nsd_tolerance: the NSD tolerance, in the distance unit.
        empty_policy: as in :func:`binary_metrics`.
    """
    _check_policy(empty_policy)
    _check_tolerance(nsd_tolerance)
    unit = "mm" if spacing is not None else "pixels"
    if empty_policy == "nan":
        one_empty = ("hd and hd95 are NaN (undefined): excluded from mean/std/median and counted in n_nan")
    elif empty_policy == "diagonal":
        one_empty = f"hd and hd95 are set to the diagonal of the evaluation grid in {unit} (worst-case sentinel)"
    else:
        one_empty = f"hd and hd95 are set to the sentinel {float(empty_policy):g} {unit}"
    return {
        "distance_unit": (f"{unit}" + (" (physical spacing of the evaluation grid, array-axis order)"
                                       if spacing is not None else
                                       " of the evaluation grid (no spacing known); not comparable across grids")),
        "surface": ("MONAI edge voxels: foreground voxels with a face-connected background neighbour "
                    "(mask XOR binary_erosion(mask)); image-border voxels count; exact Euclidean distances "
                    "between voxel centres"),
        "dice": "2|P&G|/(|P|+|G|) per case",
        "iou": "|P&G|/|P|G| per case",
        "hd": "Hausdorff distance: max over both directed surface distances (100th percentile)",
        "hd95": ("MONAI convention: max of the two directed 95th percentiles, max(q95(d(P->G)), q95(d(G->P))), "
                 "linear interpolation (torch.quantile); not the percentile of the pooled distances"),
        "nsd": (f"normalised surface distance at tolerance {float(nsd_tolerance):g} {unit}: fraction of surface "
                "voxels of both masks within the tolerance of the other surface (MONAI compute_surface_dice, "
                "no sub-voxels)"),
        "nsd_tolerance": f"{float(nsd_tolerance):g} {unit}",
        "empty_both": "both masks empty: dice 1, iou 1, hd 0, hd95 0, nsd 1",
        "empty_one": f"exactly one mask empty: dice 0, iou 0, nsd 0; {one_empty}",
        "aggregation": ("per-case values; mean/std (sample, ddof=1)/median over cases with a finite value; "
                        "n_nan counts the excluded cases"),
    }


def _surface_distances(pred: np.ndarray, gt: np.ndarray,
                       spacing: tuple[float, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed surface distances (P->G, G->P) of two non-empty masks, MONAI's edges, Euclidean."""
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():  # MONAI passes its own deprecated argument internally (1.5+)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        _, distances, _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(gt),
                                                    distance_metric="euclidean", spacing=spacing, symmetric=True)
    return distances[0].double(), distances[1].double()


def binary_metrics(pred: Any, gt: Any, *, spacing: Sequence[float] | float | None = None,
                   nsd_tolerance: float = 2.0, empty_policy: EmptyPolicy = "nan") -> dict[str, float]:
    """Dice, IoU, HD95, HD and NSD of one binary prediction against its ground truth.

    Args:
        pred: predicted mask, ``(H, W)`` or ``(D, H, W)``, bool (or 0/1 numbers; a CPU tensor is accepted).
        gt: ground-truth mask of the same shape.
        spacing: voxel size per array axis (``(sy, sx)`` or ``(sz, sy, sx)``, or one number for isotropic);
            distances are then in mm. ``None``: unit spacing, distances in pixels of this grid.
        nsd_tolerance: NSD tolerance ``tau`` in the distance unit (mm with spacing, pixels without).
        empty_policy: what hd/hd95 are when exactly one mask is empty: ``"nan"`` (default; excluded from means
            by :func:`summarize` and counted), ``"diagonal"`` (grid diagonal in the distance unit) or a number.

    Returns:
        ``{"dice", "iou", "hd95", "hd", "nsd"}`` as Python floats. Conventions: see the module docstring and
        :func:`conventions` (HD95 = MONAI's max of the two directed 95th percentiles; surface = MONAI edge voxels;
        both empty -> 1/1/0/0/1; one empty -> 0/0/policy/policy/0).
    """
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ImedsamError(f"pred has shape {p.shape} but gt has shape {g.shape}; evaluate on the same grid "
                           "(resize the prediction or the ground truth first)")
    sp = _check_spacing(spacing, p.ndim)
    tol = _check_tolerance(nsd_tolerance)
    _check_policy(empty_policy)

    n_p = int(p.sum())
    n_g = int(g.sum())
    if n_p == 0 and n_g == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "nsd": 1.0}
    if n_p == 0 or n_g == 0:
        if empty_policy == "nan":
            d = float("nan")
        elif empty_policy == "diagonal":
            scale = np.asarray(sp if sp is not None else (1.0,) * p.ndim)
            d = float(np.sqrt(np.sum((np.asarray(p.shape) * scale) ** 2)))
        else:
            d = float(empty_policy)
        return {"dice": 0.0, "iou": 0.0, "hd95": d, "hd": d, "nsd": 0.0}

    inter = int(np.logical_and(p, g).sum())
    dice = 2.0 * inter / (n_p + n_g)
    iou = inter / (n_p + n_g - inter)
    d_pg, d_gp = _surface_distances(p, g, sp)
    hd = float(max(d_pg.max(), d_gp.max()))
    hd95 = float(max(torch.quantile(d_pg, 0.95), torch.quantile(d_gp, 0.95)))
    nsd = float(((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (d_pg.numel() + d_gp.numel()))
    return {"dice": float(dice), "iou": float(iou), "hd95": hd95, "hd": hd, "nsd": nsd}


def multiclass_metrics(pred_labels: Any, gt_labels: Any, classes: Iterable[int], *,
                       spacing: Sequence[float] | float | None = None, nsd_tolerance: float = 2.0,
                       empty_policy: EmptyPolicy = "nan") -> dict[int, dict[str, float]]:
    """Per-class binary metrics of two label maps (``(H, W)`` or ``(D, H, W)`` integer arrays, same shape).

    Each class ``c`` is scored as ``binary_metrics(pred_labels == c, gt_labels == c, ...)``; a class absent from
    both maps follows the both-empty policy (dice 1). Averaging over classes is left to the caller (average per
    case then per class, or per class over cases: state which, systems.md F-38).

    Returns:
        ``{c: {"dice", "iou", "hd95", "hd", "nsd"}}`` in the order of ``classes``.
    """
    p = pred_labels.detach().cpu().numpy() if isinstance(pred_labels, torch.Tensor) else np.asarray(pred_labels)
    g = gt_labels.detach().cpu().numpy() if isinstance(gt_labels, torch.Tensor) else np.asarray(gt_labels)
    if p.shape != g.shape:
        raise ImedsamError(f"pred_labels has shape {p.shape} but gt_labels has shape {g.shape}; give label maps "
                           "on the same grid")
    classes = list(classes)
    if not classes:
        raise ImedsamError("classes is empty; give the label values to score, e.g. [1, 2, 3]")
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ImedsamError(f"classes holds {c!r}; give integer label values")
        out[int(c)] = binary_metrics(p == c, g == c, spacing=spacing, nsd_tolerance=nsd_tolerance,
                                     empty_policy=empty_policy)
    return out


def _finite_float(v: Any) -> float | None:
    """``v`` as a float, NaN for None/NaN/non-numbers (bools and strings are not metrics)."""
    if v is None:
        return float("nan")
    if isinstance(v, (bool, np.bool_, str)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Aggregate per-case rows into NaN-safe statistics.

    Args:
        rows: one dict per case (e.g. :func:`binary_metrics` output plus an id and extra fields).
        keys: the columns to summarise; default the :data:`METRIC_KEYS` present in any row.

    Returns:
        ``{key: {"mean", "std", "median", "min", "max", "n", "n_valid", "n_nan"}}``. Statistics use only finite
        values (``std`` is the sample std, ddof=1, and 0.0 for a single value); NaN/None/inf values are excluded
        and counted in ``n_nan``; with no finite value the statistics are ``None`` (JSON ``null``), never NaN.
    """
    if keys is None:
        present = {k for r in rows for k in r}
        keys = [k for k in METRIC_KEYS if k in present]
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = []
        for r in rows:
            if key not in r:
                values.append(float("nan"))
                continue
            f = _finite_float(r[key])
            if f is None:
                raise ImedsamError(f"rows[...][{key!r}]={r[key]!r} is not a number; summarise numeric columns only")
            values.append(f)
        arr = np.asarray(values, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        n_valid = int(finite.size)
        stats: dict[str, Any] = {"n": int(arr.size), "n_valid": n_valid, "n_nan": int(arr.size - n_valid)}
        if n_valid:
            stats.update(mean=float(finite.mean()), std=float(finite.std(ddof=1)) if n_valid > 1 else 0.0,
                         median=float(np.median(finite)), min=float(finite.min()), max=float(finite.max()))
        else:
            stats.update(mean=None, std=None, median=None, min=None, max=None)
        out[key] = stats
    return out


class MetricAccumulator:
    """Thin stateful wrapper: score cases one by one, keep the rows, summarise at the end.

    Example::

        acc = MetricAccumulator(nsd_tolerance=2.0)
        for case_id, pred, gt, spacing in cases:
            acc.update(pred, gt, case=case_id, spacing=spacing, grid="384x384")
        acc.summary()  # {"dice": {"mean": ..., "n_nan": ...}, ...}

    Args:
        spacing: default spacing for :meth:`update` (array-axis order), None for pixels.
        nsd_tolerance, empty_policy: as in :func:`binary_metrics`.
    """

    def __init__(self, *, spacing: Sequence[float] | float | None = None, nsd_tolerance: float = 2.0,
                 empty_policy: EmptyPolicy = "nan") -> None:
        _check_policy(empty_policy)
        self.spacing = spacing
        self.nsd_tolerance = _check_tolerance(nsd_tolerance)
        self.empty_policy = empty_policy
        self.rows: list[dict[str, Any]] = []
        self._any_spacing = spacing is not None

    def update(self, pred: Any, gt: Any, *, case: str, spacing: Sequence[float] | float | None = None,
               **extra: Any) -> dict[str, Any]:
        """Score one case and append ``{"case": case, **metrics, **extra}``; returns that row.

        ``spacing`` overrides the accumulator's default for this case.
        """
        sp = spacing if spacing is not None else self.spacing
        self._any_spacing = self._any_spacing or sp is not None
        metrics = binary_metrics(pred, gt, spacing=sp, nsd_tolerance=self.nsd_tolerance,
                                 empty_policy=self.empty_policy)
        row = {"case": str(case), **metrics, **extra}
        self.rows.append(row)
        return row

    def summary(self) -> dict[str, dict[str, Any]]:
        """:func:`summarize` over the rows so far."""
        return summarize(self.rows)

    def conventions(self) -> dict[str, str]:
        """:func:`conventions` for this accumulator's settings (mm if any case had a spacing)."""
        return conventions(spacing=(1.0,) if self._any_spacing else None, nsd_tolerance=self.nsd_tolerance,
                           empty_policy=self.empty_policy)

    def reset(self) -> None:
        """Forget all rows."""
        self.rows.clear()
        self._any_spacing = self.spacing is not None

    def __len__(self) -> int:
        return len(self.rows)
