"""Seeded training augmentation with MONAI dictionary transforms, applied to image and mask together.

Input/output conventions: ``image`` is float32 ``(C, H, W)`` on the display scale 0..255 (C = 3 for RGB),
``mask`` is float ``(1, H, W)`` in {0, 1}. Geometric operations move both (image bilinear, mask **nearest**,
zero padding outside); intensity operations touch the image only, which is clipped back to 0..255. After
augmentation the box prompt must be recomputed from the augmented mask (``augment_item`` does it).

Two policies:

- ``"imedsam"`` (default; I-MedSAM's albumentations recipe, systems.md A.14, rebuilt from MONAI transforms):
  per sample a strategy ``(n_intensity, n_geometric)`` is drawn uniformly from
  ``{(1, 2), (0, 3), (0, 2), (1, 1)}``, that many distinct operations are drawn from each pool, their order is
  shuffled and all of them are applied (probability 1).

  - intensity pool (6): brightness x[0.8, 1.2] (``RandScaleIntensityd``), contrast around the mean x[0.8, 1.2]
    (``RandScaleIntensityFixedMeand``), sharpen (``RandGaussianSharpend``), Gaussian blur
    (``RandGaussianSmoothd``), Gaussian noise with std up to ``noise_std`` per pixel and channel
    (``RandGaussianNoised``), gamma (``RandAdjustContrastd``; replaces albumentations' Posterize, which MONAI
    lacks);
  - geometric pool (8): rotation within +-``rotate_deg`` (``RandRotated``), horizontal flip, vertical flip
    (``RandFlipd``), isotropic zoom in ``scale`` (``Affine``, aspect kept), shear-x and shear-y by an angle in
    ``shear_deg``, translate-x and translate-y by a fraction in ``translate`` of the width/height
    (``RandAffined``). Albumentations' "largest_box" crop after rotation is not reproduced (corners are zero).

- ``"independent"``: the MONAI-typical pipeline, each operation applied with probability ``prob``: one
  ``RandAffined`` (rotation, scale, shear, translation together), the two flips, then the intensity pool.

Reproducibility: a call takes an integer ``seed``; the same seed gives the same result. ``sample_seed(base,
epoch, index)`` derives per-sample seeds, so runs repeat exactly, epochs differ, and DataLoader workers (which
see different indices) never share a random stream. If augmentation empties the mask, the call retries with
``sample_seed(seed, attempt)`` up to ``max_tries`` times and then returns the un-augmented sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imedsam.data.prompts import box_from_mask, jitter_box
from imedsam.errors import ImedsamError

logger = logging.getLogger(__name__)

__all__ = ["AugmentConfig", "Augmenter", "sample_seed", "augment_item", "STRATEGIES"]

#: I-MedSAM's (n_intensity, n_geometric) strategies, drawn uniformly per sample.
STRATEGIES: tuple[tuple[int, int], ...] = ((1, 2), (0, 3), (0, 2), (1, 1))
_KEYS = ("image", "mask")


def sample_seed(*parts: int) -> int:
    """A 32-bit seed derived from integers, e.g. ``(base_seed, epoch, index)``; distinct tuples give
    statistically independent seeds (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1)[0])


class AugmentConfig(BaseModel):
    """Augmentation parameters (defaults follow I-MedSAM, systems.md A.14; intensities on the 0..255 scale).

    Attributes:
        policy: ``"imedsam"`` (strategy sampling) or ``"independent"`` (each op with probability ``prob``).
        rotate_deg: rotations are uniform in ``[-rotate_deg, rotate_deg]`` degrees.
        scale: isotropic zoom factor range.
        shear_deg: shear angle range in degrees (each axis separately in the "imedsam" policy).
        translate: translation range as a fraction of the image size along that axis.
        flip: allow horizontal/vertical flips.
        brightness: multiplicative brightness change ``1 +- brightness``.
        contrast: contrast change around the mean ``1 +- contrast``.
        noise_std: Gaussian noise std is drawn uniformly in ``[0, noise_std]`` (gray levels).
        blur_sigma: Gaussian blur sigma range in pixels.
        gamma: gamma range of the contrast curve.
        prob: per-operation probability for the "independent" policy.
        intensity: enable the intensity pool (False: geometric operations only).
        geometric: enable the geometric operations (False: intensity only).
        max_tries: attempts before falling back to the un-augmented sample when the mask comes out empty.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["imedsam", "independent"] = "imedsam"
    rotate_deg: float = Field(20.0, ge=0)
    scale: tuple[float, float] = (0.8, 1.2)
    shear_deg: tuple[float, float] = (0.0, 10.0)
    translate: tuple[float, float] = (0.0, 0.1)
    flip: bool = True
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    noise_std: float = Field(7.0, ge=0)
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    gamma: tuple[float, float] = (0.7, 1.5)
    prob: float = Field(0.5, ge=0, le=1)
    intensity: bool = True
    geometric: bool = True
    max_tries: int = Field(10, ge=1)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"{list(v)} must be (low, high) with 0 < low <= high")
        return v


def _rand_iso_zoom(scale: tuple[float, float], modes: tuple[str, str]):
    """MONAI dict transform: isotropic zoom by a factor uniform in ``scale`` about the image centre (size kept).

    Built on ``monai.transforms.Affine`` (the same resampling as ``RandAffined``) because ``RandZoomd``'s
    bilinear and nearest paths disagree by about a pixel, which would misalign image and mask.
    """
    import monai.transforms as mt

    class RandIsoZoomd(mt.RandomizableTransform, mt.MapTransform):
        def __init__(self) -> None:
            mt.MapTransform.__init__(self, _KEYS)
            mt.RandomizableTransform.__init__(self, prob=1.0)
            self.zoom = 1.0

        def randomize(self, data: Any = None) -> None:
            super().randomize(None)
            self.zoom = float(self.R.uniform(scale[0], scale[1]))

        def __call__(self, data: dict) -> dict:
            self.randomize()
            d = dict(data)
            inv = 1.0 / self.zoom  # Affine scales the sampling grid: a factor > 1 makes the content smaller
            for key, mode in zip(self.keys, modes):
                d[key] = mt.Affine(scale_params=(inv, inv), mode=mode, padding_mode="zeros", image_only=True)(d[key])
            return d

    return RandIsoZoomd()


def _plain(x: Any) -> torch.Tensor:
    """MONAI MetaTensor/ndarray -> plain float32 torch tensor."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).float()


class Augmenter:
    """Seeded, image/mask-consistent augmentation; see the module docstring for the policies.

    Call ``augmenter(image, mask, seed=s)`` with ``image`` (C, H, W) float 0..255 and ``mask`` (1, H, W) {0, 1}
    (torch tensors or numpy arrays); it returns ``(image, mask, augmented)`` as float32 tensors of the same
    shapes, where ``augmented`` is False when every try emptied the mask and the input came back unchanged.
    """

    def __init__(self, config: AugmentConfig | None = None, **overrides: Any) -> None:
        cfg = config or AugmentConfig()
        self.config = cfg.model_copy(update=overrides) if overrides else cfg
        self._by_shape: dict[tuple[int, int], tuple[list, list, Callable | None]] = {}

    # -- building (lazy: importing MONAI is slow, and translations are in pixels of a given size) ------------

    def _build(self, shape: tuple[int, int]) -> tuple[list, list, Callable | None]:
        if shape in self._by_shape:
            return self._by_shape[shape]
        import monai.transforms as mt

        c = self.config
        h, w = shape
        p = 1.0 if c.policy == "imedsam" else c.prob
        rot = math.radians(c.rotate_deg)
        sh = tuple(math.tan(math.radians(a)) for a in c.shear_deg)
        ty = (c.translate[0] * h, c.translate[1] * h)
        tx = (c.translate[0] * w, c.translate[1] * w)
        geo_mode = ("bilinear", "nearest")
        intensity = [
            mt.RandScaleIntensityd("image", factors=c.brightness, prob=p),
            mt.RandScaleIntensityFixedMeand("image", factors=c.contrast, prob=p),
            mt.RandGaussianSharpend("image", alpha=(0.5, 2.0), prob=p),
            mt.RandGaussianSmoothd("image", sigma_x=c.blur_sigma, sigma_y=c.blur_sigma, prob=p),
            mt.RandGaussianNoised("image", std=c.noise_std, prob=p),
            mt.RandAdjustContrastd("image", gamma=c.gamma, prob=p),
        ]
        flips = [mt.RandFlipd(_KEYS, spatial_axis=1, prob=p), mt.RandFlipd(_KEYS, spatial_axis=0, prob=p)] \
            if c.flip else []
        if c.policy == "imedsam":
            zero = (0.0, 0.0)
            affine = dict(keys=_KEYS, prob=1.0, mode=geo_mode, padding_mode="zeros")
            geometric = [
                mt.RandRotated(_KEYS, range_x=rot, prob=1.0, mode=geo_mode, padding_mode="zeros", keep_size=True),
                *flips,
                _rand_iso_zoom(c.scale, geo_mode),
                mt.RandAffined(shear_range=(zero, sh), **affine),  # x displacement proportional to y
                mt.RandAffined(shear_range=(sh, zero), **affine),  # y displacement proportional to x
                mt.RandAffined(translate_range=(zero, tx), **affine),
                mt.RandAffined(translate_range=(ty, zero), **affine),
            ]
            built = (intensity if c.intensity else [], geometric if c.geometric else [], None)
        else:
            geometric = [
                mt.RandAffined(_KEYS, prob=p, rotate_range=rot, shear_range=(sh, sh), translate_range=(ty, tx),
                               scale_range=(c.scale[0] - 1.0, c.scale[1] - 1.0), mode=geo_mode,
                               padding_mode="zeros"),
                *flips,
            ]
            pipeline = mt.Compose((geometric if c.geometric else []) + (intensity if c.intensity else []))
            built = ([], [], pipeline)
        self._by_shape[shape] = built
        return built

    # -- applying ---------------------------------------------------------------------------------------------

    def apply(self, image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, *, seed: int,
              labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmentation attempt (no emptiness check). Shapes as in the class docstring; ``labels=True``: the
        mask is an integer label map (nearest interpolation keeps the ids) and comes back rounded, not binary;
        it may then have several channels (M, H, W), e.g. the labels of a stack of slices, all moved alike."""
        img = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).float()
        msk = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
        if (img.ndim != 3 or msk.ndim != 3 or (msk.shape[0] != 1 and not labels)
                or img.shape[1:] != msk.shape[1:]):
            raise ImedsamError(f"augment: expected image (C, H, W) and mask (1, H, W) on the same grid, got "
                               f"{tuple(img.shape)} and {tuple(msk.shape)}")
        intensity, geometric, pipeline = self._build((int(img.shape[1]), int(img.shape[2])))
        data: dict[str, Any] = {"image": img.clone(), "mask": msk.clone()}
        rng = np.random.default_rng(seed)
        if pipeline is not None:
            pipeline.set_random_state(seed=int(rng.integers(2**31)))
            data = pipeline(data)
        else:
            n_int, n_geo = STRATEGIES[int(rng.integers(len(STRATEGIES)))]
            if not geometric:  # intensity only: at least one intensity op
                n_int = max(n_int, 1)
            n_int, n_geo = min(n_int, len(intensity)), min(n_geo, len(geometric))
            ops = [intensity[i] for i in rng.choice(len(intensity), size=n_int, replace=False)]
            ops += [geometric[i] for i in rng.choice(len(geometric), size=n_geo, replace=False)]
            for i in rng.permutation(len(ops)):
                op = ops[int(i)]
                op.set_random_state(seed=int(rng.integers(2**31)))
                data = op(data)
        out_img = _plain(data["image"]).clamp_(0.0, 255.0)
        out_msk = _plain(data["mask"]).round() if labels else (_plain(data["mask"]) > 0.5).float()
        return out_img, out_msk

    def __call__(self, image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, *, seed: int,
                 labels: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Augment with retries while the mask comes out empty; see the class docstring (``labels``: as
        :meth:`apply`; the un-augmented label map comes back unchanged)."""
        for attempt in range(self.config.max_tries):
            s = seed if attempt == 0 else sample_seed(seed, attempt)
            img, msk = self.apply(image, mask, seed=s, labels=labels)
            if bool(msk.any()):
                return img, msk, True
        logger.debug("augmentation emptied the mask %d times; using the un-augmented sample",
                     self.config.max_tries)
        img = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).float().clone()
        msk = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
        return img, (msk.clone() if labels else (msk > 0.5).float()), False


def augment_item(item: dict, augmenter: Augmenter, *, seed: int, jitter: dict | None = None) -> dict:
    """Augment a dataset item ``{"image", "mask", "box", ...}`` and recompute its box from the new mask.

    The box is the tight box of the augmented mask, then jittered with ``jitter_box(**jitter)`` when
    ``jitter`` is given (with a generator seeded from ``seed``). Other keys are copied unchanged.
    """
    img, msk, _ = augmenter(item["image"], item["mask"], seed=seed)
    out = dict(item)
    out["image"], out["mask"] = img, msk
    m = msk[0].numpy() > 0
    if m.any():
        box = box_from_mask(m)
        if jitter:
            box = jitter_box(box, m.shape, rng=np.random.default_rng(sample_seed(seed, 0x6A17)), **jitter)
        out["box"] = torch.from_numpy(box)
    return out
