"""2D images (PNG, JPEG, TIFF, BMP): reading, mask and overlay writing, display conversion.

Array conventions (what ``read_image`` returns in ``Sample.array``):

* gray images: ``(H, W)``; 8-bit as uint8, 16-bit as uint16, 32-bit integer as int32, floating point as float32;
  1-bit images as uint8 0/255;
* color images: ``(H, W, 3)`` uint8 RGB. RGBA and LA lose their alpha channel (dropped, not composited);
  palette images become gray (uint8) when every palette entry is gray, RGB otherwise; CMYK/YCbCr become RGB.
* JPEG/TIFF EXIF orientation is applied (the array is what a viewer shows), recorded in ``meta["exif_transposed"]``.
* multi-page TIFF: the first page only (``meta["n_frames"]`` says how many there are);
* a file of an nnU-Net raw dataset: ``meta["channel_name"]``, its channel as ``dataset.json`` names it.

Geometry: ``shape`` is ``(H, W)``; ``spacing`` is ``(row spacing, column spacing)`` in mm, taken only from a TIFF
XResolution/YResolution with ResolutionUnit inch or centimetre, else ``None`` (distances are then in pixels).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write
from imedsam.io.nnunet import declared_channel, is_ct_channel
from imedsam.io.sample import Geometry, Sample
from imedsam.io.windowing import Window, apply_window, resolve_window

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Colors for label maps in overlays (label ``k`` gets ``LABEL_COLORS[(k - 1) % len]``; label 1 gets ``color``).
LABEL_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220),
    (255, 128, 0), (128, 0, 255), (0, 128, 128), (128, 128, 0), (255, 105, 180), (139, 69, 19),
)


def read_image(path: str | os.PathLike) -> Sample:
    """Read a PNG/JPEG/TIFF/BMP file into a ``Sample`` (conventions in the module docstring).

    Raises:
        ImedsamError: missing, unreadable or corrupt file.
    """
    p = Path(path)
    if not p.is_file():
        raise ImedsamError(f"file not found: {p}")
    meta: dict = {"format": None}
    try:
        with Image.open(p) as im:
            meta["format"] = im.format
            meta["mode"] = im.mode
            n_frames = int(getattr(im, "n_frames", 1))
            if n_frames > 1:
                meta["n_frames"] = n_frames
                logger.warning("%s has %d pages; reading the first one only", p, n_frames)
            spacing = _tiff_spacing(im)
            im.load()
            orientation = _exif_orientation(im)
            meta["exif_transposed"] = orientation not in (0, 1)
            array = _to_array(ImageOps.exif_transpose(im) if meta["exif_transposed"] else im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError,
            EOFError) as exc:
        raise ImedsamError(f"cannot read image {p}: the file is corrupt or not a supported image "
                           f"({type(exc).__name__}: {exc}); re-export it as PNG/JPEG/TIFF/BMP") from exc
    if spacing is not None and orientation in (5, 6, 7, 8):  # rotated by 90 degrees: rows and columns swap
        spacing = (spacing[1], spacing[0])
    geometry = Geometry(shape=tuple(int(s) for s in array.shape[:2]), spacing=spacing, source=p)
    channel = declared_channel(p)
    if channel is not None:  # a file of an nnU-Net raw dataset (imedsam.io.nnunet)
        meta["channel_name"] = channel
    return Sample(array=array, geometry=geometry, meta=meta)


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF is not worth failing a read for
        return 1


def _tiff_spacing(im: Image.Image) -> tuple[float, float] | None:
    """(row, column) spacing in mm from TIFF resolution tags, when the unit is inch or cm; else None."""
    tags = getattr(im, "tag_v2", None)
    if im.format != "TIFF" or tags is None:
        return None
    try:
        xres, yres = tags.get(282), tags.get(283)
        unit = int(tags.get(296, 2))  # TIFF default unit: inch
        if xres is None or yres is None:
            return None
        xres, yres = float(xres), float(yres)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    mm_per_unit = {2: 25.4, 3: 10.0}.get(unit)
    if mm_per_unit is None or xres <= 0 or yres <= 0:
        return None
    return (mm_per_unit / yres, mm_per_unit / xres)


def _to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return (np.asarray(im, dtype=bool).astype(np.uint8)) * np.uint8(255)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode == "LA" or mode == "La":
        return np.asarray(im.getchannel("L"), dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im, dtype=np.int32)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)  # 16-bit files some decoders expose as 32-bit
        return arr.copy()
    if mode == "F":
        return np.asarray(im, dtype=np.float32).copy()
    if mode in ("P", "PA"):
        palette = im.getpalette() or []
        entries = np.asarray(palette, dtype=np.int32).reshape(-1, 3) if len(palette) >= 3 else np.zeros((0, 3))
        used = np.unique(np.asarray(im))
        used = used[used < len(entries)]
        rows = entries[used] if len(entries) else entries
        if len(rows) and np.all(rows[:, 0] == rows[:, 1]) and np.all(rows[:, 1] == rows[:, 2]):
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # RGBA, RGBa, CMYK, YCbCr, LAB, HSV, RGBX...


# --------------------------------------------------------------------------------------------------- writing


def _mask_to_png_array(mask: np.ndarray, binary_value: int, argument: str = "mask") -> np.ndarray:
    """Binary (bool or values in {0, 1}) -> uint8 0/binary_value; labels -> uint8 if max <= 255 else uint16."""
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImedsamError(f"{argument} must be 2D (H, W), got shape {arr.shape}; write volumes with write_volume")
    if not 1 <= int(binary_value) <= 255:
        raise ImedsamError(f"binary_value must be in 1..255, got {binary_value}")
    if arr.dtype == bool:
        return arr.astype(np.uint8) * np.uint8(binary_value)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ImedsamError(f"{argument} has non-integer values (dtype {arr.dtype}): threshold probabilities "
                               "(e.g. mask > 0.5) or round labels before writing")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ImedsamError(f"{argument} must be bool or integer labels, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ImedsamError(f"{argument} is empty (shape {arr.shape})")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 65535:
        raise ImedsamError(f"{argument} labels must lie in 0..65535 to fit a PNG, got {lo}..{hi}")
    if hi <= 1:
        return arr.astype(np.uint8) * np.uint8(binary_value)
    return arr.astype(np.uint8 if hi <= 255 else np.uint16)


def _check_png(path: Path, argument: str) -> None:
    if path.suffix.lower() != ".png":
        raise ImedsamError(f"{argument} {path}: masks and overlays are written as PNG; use a .png file name")


def write_mask(path: str | os.PathLike, mask: np.ndarray, *, binary_value: int = 255) -> Path:
    """Write a 2D mask as a PNG, atomically, creating the parent folder.

    Args:
        path: the ``.png`` file.
        mask: ``(H, W)`` (or ``(H, W, 1)``). A bool mask, or an integer mask whose values are all in {0, 1}, is
            binary and is written as uint8 0/``binary_value``. Other integer masks are label maps written with
            their values: uint8 when the largest label is <= 255, else uint16 (labels must be in 0..65535).
            Float masks are accepted only when every value is an integer.
        binary_value: the foreground value of binary masks (1..255; 255 is the convention of the data here).

    Returns:
        the written path.
    """
    p = Path(path)
    _check_png(p, "mask path")
    arr = _mask_to_png_array(mask, binary_value)
    image = Image.fromarray(arr)  # uint8 -> "L", uint16 -> "I;16"
    return atomic_write(p, lambda tmp: image.save(tmp, format="PNG"))


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a non-zero label that touch (4-neighbourhood) a different label or the image border."""
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    center = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy: dy + labels.shape[0], dx: dx + labels.shape[1]] != center
    return edge & (center != 0)


def overlay(image_rgb: np.ndarray, mask: np.ndarray, *, color: tuple[int, int, int] = (255, 0, 0),
            alpha: float = 0.4, contour: bool = True) -> np.ndarray:
    """Blend ``mask`` over ``image_rgb`` and return the uint8 ``(H, W, 3)`` result (see ``write_overlay``)."""
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImedsamError(f"image_rgb must be (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ImedsamError(f"image_rgb must be uint8, got {img.dtype}; convert it with to_display_rgb first")
    img = img[..., :3]
    labels = np.asarray(mask)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != img.shape[:2]:
        raise ImedsamError(f"mask shape {labels.shape} does not match image shape {img.shape[:2]}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ImedsamError(f"alpha must be in [0, 1], got {alpha}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(np.nan_to_num(labels)).astype(np.int64)
    labels = labels.astype(np.int64, copy=False)
    color_arr = np.zeros((labels.shape[0], labels.shape[1], 3), dtype=np.float32)
    ids = [int(v) for v in np.unique(labels) if v != 0]
    for k in ids:
        c = color if k == 1 or len(ids) == 1 else LABEL_COLORS[(k - 1) % len(LABEL_COLORS)]
        color_arr[labels == k] = np.asarray(c, dtype=np.float32)
    out = img.astype(np.float32)
    fg = labels != 0
    out[fg] = (1.0 - alpha) * out[fg] + alpha * color_arr[fg]
    if contour:
        edge = _boundary(labels)
        out[edge] = color_arr[edge]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_overlay(path: str | os.PathLike, image_rgb: np.ndarray, mask: np.ndarray, *,
                  color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.4, contour: bool = True) -> Path:
    """Write ``image_rgb`` with ``mask`` blended on top as a PNG, atomically, creating the parent folder.

    Args:
        path: the ``.png`` file.
        image_rgb: uint8 ``(H, W, 3)`` (a gray ``(H, W)`` uint8 image is replicated; use ``to_display_rgb`` for
            other dtypes).
        mask: ``(H, W)``; non-zero is foreground. A mask with one non-zero value is drawn in ``color``; a label
            map with several labels draws label 1 in ``color`` and label ``k > 1`` in
            ``LABEL_COLORS[(k - 1) % len(LABEL_COLORS)]``.
        color: RGB of a binary mask.
        alpha: opacity of the fill, 0 (none) to 1 (opaque).
        contour: also draw the mask boundary (4-neighbourhood) fully opaque.
    """
    p = Path(path)
    _check_png(p, "overlay path")
    rgb = overlay(image_rgb, mask, color=color, alpha=alpha, contour=contour)
    image = Image.fromarray(rgb)
    return atomic_write(p, lambda tmp: image.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------------- display


#: the display window of volumes whose nnU-Net dataset declares them CT (``channel_names`` "CT"), when no window
#: is given and the file has none: MedSAM's (and LiteMedSAM's) CT preprocessing, level 40 / width 400 HU, i.e.
#: [-160, 240] HU (MA-SAM clips BTCV at [-200, 250]). A fixed HU window is the same for every volume and needs
#: no dataset statistics, so a lone file of the dataset is mapped as in training.
CT_DEFAULT_WINDOW = "soft_tissue"

#: the percentiles of the default mapping of MR and of anything not declared CT (MedSAM's MR preprocessing)
PERCENTILES: tuple[float, float] = (0.5, 99.5)

#: voxels windowed at a time by :func:`to_display_volume` (bounds its float32 temporaries to 16 MB each)
_CHUNK_VOXELS = 1 << 22


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return float(lo), float(hi)


def to_display_rgb(sample: Sample | np.ndarray, *, window: Window | None = None) -> np.ndarray:
    """Display- and encoder-ready uint8 RGB ``(H, W, 3)`` from a 2D sample (or array) of any dtype.

    Rules, in order:

    * ``window`` (``(center, width)`` or a name from ``CT_WINDOWS``) maps ``[c - w/2, c + w/2]`` to 0..255;
      without it, a ``Sample`` whose ``meta["window"]`` is set (``read_dicom`` sets it) uses that window;
    * otherwise uint8 is kept as is and bool becomes 0/255;
    * other data whose nnU-Net dataset declares it CT (``meta["channel_name"]``, :mod:`imedsam.io.nnunet`) gets
      :data:`CT_DEFAULT_WINDOW`;
    * any other dtype is mapped linearly from its 0.5th..99.5th percentiles (finite values; all channels
      together for color) to 0..255 and clipped: robust to a few extreme voxels (CT padding, MR hot spots).
      A constant image becomes 0.

    Gray ``(H, W)`` is replicated to 3 channels; RGBA drops alpha. DICOM MONOCHROME1 (``meta
    ["photometric_interpretation"]``) is inverted so that high values are dark, as the standard says.
    """
    meta: dict = {}
    if isinstance(sample, Sample):
        meta = sample.meta
        if sample.is_volume:
            raise ImedsamError("to_display_rgb needs a 2D sample; pass one slice of the volume "
                               "(e.g. sample.array[k])")
        arr = np.asarray(sample.array)
    else:
        arr = np.asarray(sample)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ImedsamError(f"to_display_rgb needs (H, W) or (H, W, 3), got shape {arr.shape}")
    if window is None and meta.get("window") is not None:
        window = tuple(meta["window"])
    if window is None and arr.dtype not in (np.uint8, bool) and is_ct_channel(meta.get("channel_name")):
        window = CT_DEFAULT_WINDOW  # an nnU-Net dataset declares it CT (display_window)
    if window is not None:
        center, width = resolve_window(window)
        out = apply_window(arr, center, width)
    elif arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == bool:
        out = arr.astype(np.uint8) * np.uint8(255)
    else:
        lo, hi = _robust_range(np.asarray(arr, dtype=np.float64))
        out = apply_window(arr, (lo + hi) / 2.0, hi - lo) if hi > lo else np.zeros(arr.shape, np.uint8)
    if str(meta.get("photometric_interpretation", "")).upper() == "MONOCHROME1" and out.ndim == 2:
        out = 255 - out
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def display_window(sample: Sample, window: Window | None = None) -> tuple[Window | None, str]:
    """The window that :func:`to_display_volume` (and :func:`to_display_rgb`) applies to ``sample`` and where it
    comes from, in order: ``window`` (``"--window"``), the file's own (``"file"``: DICOM WindowCenter/Width);
    then, without either, uint8 data is kept as is (``(None, "uint8 kept as is")``); else the CT default
    :data:`CT_DEFAULT_WINDOW` when the sample's nnU-Net dataset declares its channel CT (``"dataset.json: CT"``,
    :mod:`imedsam.io.nnunet`); else ``(None, "percentiles 0.5-99.5")``: the finite values' 0.5th..99.5th
    percentiles (MR and everything else)."""
    if window is not None:
        return window, "--window"
    if sample.meta.get("window") is not None:
        w = sample.meta["window"]
        return (w if isinstance(w, str) else tuple(w)), "file"
    dtype = np.asarray(sample.array).dtype
    if dtype == np.uint8 or dtype == bool:
        return None, "uint8 kept as is" if dtype == np.uint8 else "bool as 0/255"
    channel = sample.meta.get("channel_name")
    if is_ct_channel(channel):
        return CT_DEFAULT_WINDOW, f"dataset.json: {channel}"
    return None, f"percentiles {PERCENTILES[0]:g}-{PERCENTILES[1]:g}"


def intensity_rule(sample: Sample, window: Window | None = None) -> str:
    """One line for reports: how :func:`to_display_volume` maps ``sample`` to 0..255."""
    chosen, source = display_window(sample, window)
    if chosen is None:
        return source if source.startswith(("uint8", "bool")) else f"{source} of the volume mapped to 0..255"
    center, width = resolve_window(chosen)
    name = f"{chosen} " if isinstance(chosen, str) else ""
    return f"window {name}(center {center:g}, width {width:g}) from {source}"


def _exact_int_percentiles(arr: np.ndarray, q: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(arr, q)`` (linear interpolation) of an integer array of at most 16 bits, exactly, from a
    histogram of its values built a chunk at a time (no copy of the array)."""
    lo, hi = int(arr.min()), int(arr.max())
    counts = np.zeros(hi - lo + 1, np.int64)
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK_VOXELS):
        chunk = flat[start:start + _CHUNK_VOXELS].astype(np.int32) - lo
        counts += np.bincount(chunk, minlength=counts.size)
    cum = np.cumsum(counts)

    def order_statistic(k: int) -> int:  # the k-th smallest value (0-based)
        return lo + int(np.searchsorted(cum, k, side="right"))

    out = []
    for p in q:
        pos = p / 100.0 * (flat.size - 1)
        i = int(np.floor(pos))
        low, high = order_statistic(i), order_statistic(min(i + 1, flat.size - 1))
        out.append(float(low + (pos - i) * (high - low)))
    return tuple(out)


def _percentile_range(arr: np.ndarray) -> tuple[float, float] | None:
    """(lo, hi) of the default mapping: the finite values' :data:`PERCENTILES`, or their min and max when those
    are equal; None without a finite value. Integer volumes need no copy; float ones one (np.percentile's)."""
    if arr.size == 0:
        return None
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        lo, hi = _exact_int_percentiles(arr, PERCENTILES)
        vals = arr
    else:
        floating = np.issubdtype(arr.dtype, np.floating)
        vals = arr[np.isfinite(arr)] if floating and not np.isfinite(arr).all() else arr
        if vals.size == 0:
            return None
        lo, hi = (float(v) for v in np.percentile(vals, PERCENTILES))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    return lo, hi


def to_display_volume(sample: Sample, *, window: Window | None = None) -> np.ndarray:
    """uint8 ``(D, H, W)`` from a volume sample, with ONE intensity mapping for the whole volume (so every slice,
    in training and at inference, sees the same scale), chosen by :func:`display_window`: ``window``
    (``(center, width)`` or a CT window name), else the file's window (``meta["window"]``, DICOM), else uint8 as
    is, else :data:`CT_DEFAULT_WINDOW` when the volume's nnU-Net dataset declares it CT, else the volume's
    0.5..99.5 percentiles of its finite values (MR and any other data). A constant volume becomes 0.

    Memory: the mapping runs a block of slices at a time into the uint8 result, and the percentiles of 8/16-bit
    integer volumes come from a histogram, so the peak beyond the input and the output is a few float32 blocks."""
    arr = np.asarray(sample.array)
    w, _ = display_window(sample, window)
    if w is None and arr.dtype == np.uint8:
        return arr
    if w is None and arr.dtype == bool:
        return arr.astype(np.uint8) * np.uint8(255)
    if w is not None:
        center, width = resolve_window(w)
    else:
        found = _percentile_range(arr)
        if found is None or found[1] <= found[0]:
            return np.zeros(arr.shape, np.uint8)
        lo, hi = found
        center, width = (lo + hi) / 2.0, hi - lo
    if arr.ndim == 0 or arr.size == 0:
        return apply_window(arr, center, width)
    out = np.empty(arr.shape, np.uint8)
    step = max(1, _CHUNK_VOXELS // max(1, arr[0].size))
    for start in range(0, arr.shape[0], step):
        out[start:start + step] = apply_window(arr[start:start + step], center, width)
    return out


def write_uncertainty(path: str | os.PathLike, uncertainty: np.ndarray) -> dict[str, str]:
    """Write a per-pixel uncertainty map as a viewable PNG plus the exact values in a ``.npy`` beside it.

    Args:
        path: the ``.png`` file; the float32 values go to the same name with suffix ``.npy``. Both atomic.
        uncertainty: ``(H, W)`` real, non-negative (variance, entropy... in the model's units).

    The PNG is uint8 gray, linear from 0 (black) to the map's maximum (white), so it shows where the model is
    unsure, not how much; read the ``.npy`` for values.

    Returns:
        ``{"uncertainty": <png path>, "uncertainty_npy": <npy path>}`` (absolute paths).
    """
    p = Path(path)
    _check_png(p, "uncertainty path")
    arr = np.asarray(uncertainty, dtype=np.float32)
    if arr.ndim != 2:
        raise ImedsamError(f"uncertainty for {p} must be (H, W), got shape {arr.shape}")
    finite = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(finite.max()) if finite.size else 0.0
    gray = (np.clip(finite / top, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) if top > 0 else np.zeros(arr.shape,
                                                                                                       np.uint8)
    image = Image.fromarray(gray)
    npy = p.with_suffix(".npy")
    atomic_write(p, lambda tmp: image.save(tmp, format="PNG"))

    def _save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    atomic_write(npy, _save_npy)
    return {"uncertainty": str(p.resolve()), "uncertainty_npy": str(npy.resolve())}


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W, 3) uint8 display image to ``size`` = (H_o, W_o), for overlays on another grid."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((int(size[1]), int(size[0])), Image.BILINEAR))
