"""The one place where images and prompts move between the original grid and the encoder input.

Conventions
-----------
* Original image: array (H, W) or (H, W, C); pixel (row i, col j) covers [j, j+1) x [i, i+1) in continuous
  coordinates, so its centre is (j + 0.5, i + 0.5). Points are (x, y) and boxes are (x0, y0, x1, y1) in those
  pixel coordinates of the ORIGINAL image, as SAM's predictor takes them.
* Encoder input: the longest side is resized to ``S = preprocess.img_size``, the other side to
  ``round(side * S / longest)``, the result padded at the bottom/right to S x S. A coordinate c of the
  original image becomes ``c * new / old`` per axis (SAM's ``ResizeLongestSide.apply_coords``).
* ``preprocess.pipeline == "official"`` (LiteMedSAM): MedSAM-lite's inference script instead: the uint8 image is
  resized with OpenCV's area interpolation, one ratio ``S / max(H, W)`` maps both axes and box corners are
  floored to integers (``int(c * ratio)``); the logits are restored as below (crop, bilinear).
* Restoring: the decoder's logits cover the S x S input; the valid region is ``[0, new_h) x [0, new_w)``. Discrete
  decoders are upsampled to S x S, cropped to the valid region and resized to the requested grid (this is what the
  official SAM and LiteMedSAM predictors do); implicit decoders are queried directly at the requested grid's pixel
  centres mapped into the valid region (:func:`grid_query_coords`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imedsam.errors import ImedsamError

@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the encoder, with what is needed to map back.

    Attributes:
        tensor: (1, 3, S, S) float32 encoder input (normalised as the backbone expects, zero padded).
        original_size: (H, W) of the original image.
        input_size: (new_h, new_w) of the resized image inside the S x S input (the valid region).
        img_size: S.
        pipeline: ``"imedsam"`` or ``"official"`` (:class:`imedsam.sam.model.Preprocess`): how prompts map in.
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    img_size: int
    pipeline: str = "imedsam"

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): encoder-input pixels per original pixel along rows and columns (the official pipeline
        uses one ratio, ``S / max(H, W)``, for both)."""
        if self.pipeline == "official":
            ratio = self.img_size / max(self.original_size)
            return (ratio, ratio)
        return (self.input_size[0] / self.original_size[0], self.input_size[1] / self.original_size[1])


def resized_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """Shape after resizing the longest side to ``target`` (SAM's rounding: int(x + 0.5))."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def as_rgb_float(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) array of any dtype -> float32 (H, W, 3); values are kept (no rescaling)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImedsamError(f"image: expected a 2D gray (H, W) or RGB (H, W, 3) array, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImedsamError(f"image: empty image of shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImedsamError("image: it has NaN or infinite values; replace them (e.g. numpy.nan_to_num) first")
    return array.astype(np.float32, copy=False)


def prepare_image(image: np.ndarray, preprocess, device: torch.device | str = "cpu") -> PreparedImage:
    """Resize, normalise and pad an original image for the encoder.

    Args:
        image: (H, W) or (H, W, 3) array. For ``normalize == "sam"`` it should be on the 0-255 display scale
            (use :func:`imedsam.io.to_display_rgb` for CT/MR); ``"minmax"`` (LiteMedSAM) rescales it anyway.
        preprocess: the backbone's :class:`imedsam.sam.model.Preprocess` (img_size, normalize, pixel mean/std).
    """
    if preprocess.pipeline == "official":
        return _prepare_official(image, preprocess, device)
    rgb = as_rgb_float(image)
    height, width = rgb.shape[:2]
    size = int(preprocess.img_size)
    new_h, new_w = resized_shape(height, width, size)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device)
    if (new_h, new_w) != (height, width):
        antialias = new_h < height or new_w < width
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=antialias)
    x = preprocess.normalize_tensor(x)
    x = F.pad(x, (0, size - new_w, 0, size - new_h))
    return PreparedImage(tensor=x.contiguous(), original_size=(height, width), input_size=(new_h, new_w), img_size=size)


def require_opencv():
    try:
        import cv2
    except ImportError:
        raise ImedsamError("--preprocess official: MedSAM-lite's pipeline resizes with OpenCV; install it with "
                           "`pip install opencv-python-headless` (or imedsam[official])") from None
    return cv2


def _prepare_official(image: np.ndarray, preprocess, device: torch.device | str) -> PreparedImage:
    """MedSAM-lite's inference script: uint8 (H, W, 3) -> ``cv2.resize(INTER_AREA)`` to the longest side S
    (rounded as SAM) -> min-max over the resized image -> zero padding at the bottom/right."""
    cv2 = require_opencv()
    rgb = as_rgb_float(image)
    if np.asarray(image).dtype != np.uint8:  # the script reads uint8 images; put other dtypes on that scale
        rgb = np.clip(np.rint(rgb), 0, 255)
    rgb = np.ascontiguousarray(rgb.astype(np.uint8))
    height, width = rgb.shape[:2]
    size = int(preprocess.img_size)
    new_h, new_w = resized_shape(height, width, size)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)[None].to(device)
    x = F.pad(preprocess.normalize_tensor(x), (0, size - new_w, 0, size - new_h))
    return PreparedImage(tensor=x.contiguous(), original_size=(height, width), input_size=(new_h, new_w),
                         img_size=size, pipeline="official")


def check_box(box, original_size: tuple[int, int], name: str = "--box") -> np.ndarray:
    """Validate an (x0, y0, x1, y1) box in original pixel coordinates; returns float64 (4,).

    Half-open, as COCO/SA-1B boxes (SAM's training data): x1, y1 are one past the box's last column/row, so the
    one-pixel box at (x, y) is (x, y, x + 1, y + 1) (see :mod:`imedsam.data.prompts`).
    """
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.size != 4 or not np.all(np.isfinite(b)):
        raise ImedsamError(f"{name}: expected 4 numbers X0 Y0 X1 Y1, got {list(np.asarray(box).reshape(-1))}")
    height, width = original_size
    x0, y0, x1, y1 = b
    if x1 <= x0 or y1 <= y0:
        raise ImedsamError(f"{name}: degenerate box {b.tolist()}: need X0 < X1 and Y0 < Y1 (X1, Y1 one past the "
                           "last pixel)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ImedsamError(f"{name}: box {b.tolist()} lies outside the {width}x{height} (WxH) image")
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))])


def check_points(points, labels, original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, 2) xy points and (N,) labels in {0, 1}; returns float64 and int64 arrays."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    if len(lab) != len(p):
        raise ImedsamError(f"--point: {len(p)} points but {len(lab)} labels; give X Y LABEL for each point")
    if not np.all(np.isin(lab, (0, 1))):
        raise ImedsamError(f"--point: labels must be 1 (foreground) or 0 (background), got {sorted(set(lab.tolist()))}")
    height, width = original_size
    outside = (p[:, 0] < 0) | (p[:, 0] >= width) | (p[:, 1] < 0) | (p[:, 1] >= height)
    if outside.any():
        raise ImedsamError(f"--point: point {p[outside][0].tolist()} lies outside the {width}x{height} (WxH) image")
    return p, lab.astype(np.int64)


def to_input_coords(coords: np.ndarray, prepared: PreparedImage) -> np.ndarray:
    """Map (..., 2) xy coordinates (or (..., 4) boxes) from the original image to the encoder input
    (the official pipeline floors box corners, as MedSAM-lite's ``resize_box_to_256``)."""
    sy, sx = prepared.scale
    out = np.asarray(coords, dtype=np.float64).copy()
    out[..., 0::2] *= sx
    out[..., 1::2] *= sy
    if prepared.pipeline == "official" and out.shape[-1] == 4:
        out = np.trunc(out)
    return out


def restore_logits(logits: torch.Tensor, prepared: PreparedImage, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Discrete decoder logits covering the S x S input -> logits on an output grid of the original image.

    Args:
        logits: (B, K, h, w) logits over the padded encoder input (e.g. SAM's 256 x 256 low-res masks).
        size: output grid (H_o, W_o); default the original size.
    Returns:
        (B, K, H_o, W_o) float logits.
    """
    size = tuple(size or prepared.original_size)
    s = prepared.img_size
    x = F.interpolate(logits.float(), size=(s, s), mode="bilinear", align_corners=False)
    x = x[..., : prepared.input_size[0], : prepared.input_size[1]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def grid_query_coords(prepared: PreparedImage, size: tuple[int, int] | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel centres of an output grid over the original image, in the encoder frame, normalised to (-1, 1).

    Row i of an H_o-row grid has centre (i + 0.5) / H_o of the original height, i.e. ``(i + 0.5) / H_o * new_h``
    encoder pixels, i.e. normalised ``2 * that / S - 1`` (the align_corners=False convention of grid_sample).
    Returns (H_o * W_o, 2) in (y, x) order, row-major.
    """
    h_o, w_o = tuple(size or prepared.original_size)
    s = prepared.img_size
    new_h, new_w = prepared.input_size
    ys = (torch.arange(h_o, device=device, dtype=torch.float32) + 0.5) / h_o * new_h * 2 / s - 1
    xs = (torch.arange(w_o, device=device, dtype=torch.float32) + 0.5) / w_o * new_w * 2 / s - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


#: logit given to a pixel fully inside (+) or outside (-) a mask turned into a mask prompt
MASK_PROMPT_LOGIT = 10.0


def mask_to_low_res(mask: np.ndarray, prepared: PreparedImage, low_res_size: tuple[int, int]) -> torch.Tensor:
    """A (H, W) mask on the original grid (bool, or probabilities in [0, 1]) -> a SAM mask prompt
    ``(1, 1, h, w)``: mapped into the encoder frame as the image is (resize, bottom/right padding as background),
    area-averaged to the prompt grid ``low_res_size`` and turned into logits ``MASK_PROMPT_LOGIT * (2 p - 1)``
    (+10 inside, -10 outside, 0 on the boundary), the scale of SAM's own low-res logits."""
    m = np.asarray(mask, dtype=np.float32)
    if m.shape != tuple(prepared.original_size):
        raise ImedsamError(f"--mask-input: mask is {m.shape[0]}x{m.shape[1]} (HxW) but the image is "
                           f"{prepared.original_size[0]}x{prepared.original_size[1]}; give a mask of the image")
    x = torch.from_numpy(np.clip(m, 0, 1))[None, None]
    new_h, new_w = prepared.input_size
    s = prepared.img_size
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (0, s - new_w, 0, s - new_h))
    x = F.interpolate(x, size=low_res_size, mode="area")
    return MASK_PROMPT_LOGIT * (2 * x - 1)
