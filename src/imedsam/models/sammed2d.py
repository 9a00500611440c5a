"""SAM-Med2D assembled: a SAM-family backbone + an adapter beside every block's MLP + SAM's prompt encoder and
mask decoder, both trained (systems.md §B).

Data flow (one image, any number of prompt sets sharing its embedding)::

    image (1,3,S,S) --encoder + SAM-Med2D adapters--> E (1,C,h,w)
    box / points / previous low-res logits --prompt encoder--> sparse (B,n,C), dense (B,C,h,w)
    --mask decoder--> 3 candidate masks (B,3,4h,4w) + predicted IoU (B,3) --best predicted IoU--> (B,1,4h,4w)
    --resize once--> logits on the requested grid of the original image

Where the adapters sit: in the ``mlp_parallel`` slot of every attention block (:mod:`imedsam.peft.med2d`),
sharing the MLP's norm; on the ViT (SAM ViT-B/L/H, 256 px by default as SAM-Med2D) that is all 12/24/32 blocks,
on LiteMedSAM's TinyViT the 10 attention blocks of stages 1-3 (grids 128², 64², 64² at 256 px, widths 128, 160,
320); stage 0 (MBConv, no attention) has none. Trainable: the adapters, the whole prompt encoder (point, box and
mask-prompt embeddings really train: systems.md §F.23, §F.24) and the whole mask decoder; the backbone is frozen.

``mode: reference`` is the official adapter (full width, squeeze ratio 4, not zero at initialisation): on ViT-B at
256² that is exactly 184,569,136 trainable parameters (adapters 180,504,576 + prompt encoder 6,220 + mask decoder
4,058,340). The default (``paper``) is light: a 16-channel spatial bottleneck, squeeze ratio 16 and a zero
initialised output LayerNorm (the adapted encoder starts as the pretrained one).

Official SAM-Med2D checkpoints (``sam-med2d_b.pth``: the whole model under ``"model"``, adapters as
``image_encoder.blocks.N.Adapter.*``) load strictly with ``--model sam_med2d --checkpoint sam-med2d_b.pth``:
the adapter sizes, the input size and ``mode: reference`` are read off the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from imedsam.errors import ImedsamError
from imedsam.models.base import DecodeResult, Prompts, trainable_breakdown
from imedsam.models.config import Strict, SystemConfig
from imedsam.models.sam import SamDecoding
from imedsam.models.spec import SystemSpec
from imedsam.peft.backbone import freeze_backbone
from imedsam.peft.med2d import SLOT_KEY, attach_med2d
from imedsam.sam.build import build_sam, get_spec
from imedsam.sam.model import SamModel
from imedsam.sam.prepare import PreparedImage, restore_logits

log = logging.getLogger(__name__)

OFFICIAL_ADAPTER = ".Adapter."  # the official checkpoints' adapter key infix


class Med2DPeftConfig(Strict):
    """SAM-Med2D's adapters (:mod:`imedsam.peft.med2d`); ``null`` fields follow the mode (paper / reference)."""

    adapter_dim: int | Literal["full"] | None = Field(None, description="spatial bottleneck width; 'full' = the "
                                                                         "token width (official); null: paper 16, "
                                                                         "reference full")
    se_reduction: int | None = Field(None, ge=1, description="channel branch hidden = width / se_reduction; null: "
                                                             "paper 16, reference 4")
    zero_init: bool | None = Field(None, description="output LayerNorm starts at 0 (adapter adds 0 at init); null: "
                                                     "paper true, reference false")
    blocks: Literal["all"] | tuple[int, ...] = Field("all", description="'all' or attention-block indices")

    def resolved(self, mode: str) -> dict:
        paper = mode == "paper"
        dim = self.adapter_dim if self.adapter_dim is not None else (16 if paper else "full")
        if isinstance(dim, int) and dim < 1:
            raise ImedsamError(f"config key model.peft.adapter_dim: must be >= 1 or 'full', got {dim}")
        return {"adapter_dim": None if dim == "full" else int(dim),
                "se_reduction": self.se_reduction or (16 if paper else 4),
                "zero_init": (paper if self.zero_init is None else self.zero_init),
                "blocks": None if self.blocks == "all" else list(self.blocks)}


class SamMed2DConfig(SystemConfig):
    """SAM-Med2D: ``peft`` (the adapters) and how the mask decoder answers."""

    system: Literal["sam_med2d"] = "sam_med2d"
    peft: Med2DPeftConfig = Med2DPeftConfig()
    multimask_output: bool = Field(True, description="train and predict with SAM's 3 candidate masks, keeping the "
                                                     "best predicted IoU (SAM-Med2D); false: SAM's single-mask token")


class SamMed2D(SamDecoding):
    """SAM-Med2D on any SAM-family backbone (module docstring)."""

    name: ClassVar[str] = "sam_med2d"
    val_protocols: ClassVar[tuple[str, ...]] = ("box", "points:1")

    def __init__(self, sam: SamModel, config: SamMed2DConfig) -> None:
        super().__init__()
        self.config = config
        freeze_backbone(sam.image_encoder)
        attach_med2d(sam.image_encoder, **config.peft.resolved(config.mode))
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder.requires_grad_(True)
        self.mask_decoder = sam.mask_decoder.requires_grad_(True)
        self.preprocess = sam.preprocess

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return self.image_encoder(images, valid_hw=valid_hw)

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        if uncertainty:
            raise ImedsamError("--uncertainty: SAM-Med2D's mask decoder gives no uncertainty map; use --model imedsam")
        chosen, chosen_iou, low_res, iou = self.predict_low_res(embeddings, prompts)
        if multimask and low_res.shape[1] > 1:
            chosen, chosen_iou = low_res, iou
        logits = restore_logits(chosen, prepared, size)
        return DecodeResult(logits=logits, scores=chosen_iou.float(), low_res_logits=chosen.float())

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Prompt encoder and mask decoder at ``optim.lr_decoder``, the encoder adapters at ``optim.lr_adapter``."""
        groups: dict[str, list[torch.nn.Parameter]] = {"decoder": [], "adapters": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups["adapters" if name.startswith("image_encoder.") else "decoder"].append(param)
        return groups


# ----------------------------------------------------------------------------------------- official checkpoints


def is_official_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    return any(OFFICIAL_ADAPTER in k for k in state)


def official_config(state: Mapping[str, torch.Tensor], config: SamMed2DConfig) -> SamMed2DConfig:
    """The config an official SAM-Med2D state dict was trained with: reference mode, its adapter widths and its
    input size (from ``pos_embed``), on the backbone of its width."""
    from imedsam.sam.checkpoint import guess_model_name

    backbone = guess_model_name(state)
    if backbone is None or get_spec(backbone).encoder != "vit":
        raise ImedsamError("--checkpoint: this SAM-Med2D checkpoint has no SAM ViT image encoder keys")
    key = next(k for k in state if k.endswith(f"{OFFICIAL_ADAPTER}spatial.0.weight"))
    width = state[key.replace(f"{OFFICIAL_ADAPTER}spatial.0.weight", ".norm1.weight")].shape[0]
    adapter_dim = int(state[key].shape[0])
    hidden = int(state[key.replace("spatial.0.weight", "channel.0.weight")].shape[0])
    blocks = sorted({int(k.split(".")[2]) for k in state if OFFICIAL_ADAPTER in k})
    grid = int(state["image_encoder.pos_embed"].shape[1])
    peft = Med2DPeftConfig(adapter_dim="full" if adapter_dim == width else adapter_dim,
                           se_reduction=width // hidden, zero_init=False,
                           blocks="all" if len(blocks) == len(attention_blocks_count(backbone)) else tuple(blocks))
    update = {"backbone": backbone, "mode": "reference", "peft": peft, "img_size": config.img_size or grid * 16}
    if backbone != config.backbone:
        log.info("SAM-Med2D checkpoint: backbone %s (from its keys)", backbone)
    return config.model_copy(update=update)


def attention_blocks_count(backbone: str) -> range:
    from imedsam.sam.vit import VIT_CONFIGS

    return range(VIT_CONFIGS[get_spec(backbone).encoder_config["config"]]["depth"])


def map_official_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAM-Med2D keys -> ours: ``image_encoder.blocks.N.Adapter.X`` becomes
    ``image_encoder.blocks.N.mlp_parallel.med2d.X``; every other key is SAM's and stays."""
    return {k.replace(OFFICIAL_ADAPTER, f".mlp_parallel.{SLOT_KEY}."): v for k, v in state.items()}


def load_official(system: SamMed2D, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a whole official SAM-Med2D state dict strictly (every key used, every tensor of ours set)."""
    from imedsam.sam.vit import adapt_vit_state_dict

    mapped = adapt_vit_state_dict(map_official_keys(state), system.image_encoder, prefix="image_encoder.")
    own = system.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    shapes = [k for k in own.keys() & mapped.keys() if tuple(own[k].shape) != tuple(mapped[k].shape)]
    if missing or unexpected or shapes:
        raise ImedsamError(f"--checkpoint: {source} does not match SAM-Med2D ({len(missing)} missing, e.g. "
                           f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shapes)} of "
                           f"another shape, e.g. {shapes[:3]})")
    system.load_state_dict(mapped, strict=True)
    log.info("loaded the official SAM-Med2D checkpoint %s (%d tensors)", source, len(mapped))


def build_sammed2d(config: SamMed2DConfig, *, pretrained: bool = True) -> SamMed2D:
    """SAM-Med2D; ``config.checkpoint`` may be a SAM base checkpoint (adapters fresh) or an official SAM-Med2D one."""
    state = None
    if config.checkpoint is not None and pretrained:
        from imedsam.sam.checkpoint import read_state_dict

        state = read_state_dict(config.checkpoint)
        if is_official_checkpoint(state):
            config = official_config(state, config)
        else:
            state = None
    if config.img_size is None and get_spec(config.backbone).encoder == "vit":
        config = config.model_copy(update={"img_size": SPEC.vit_size})
    if state is not None:
        sam = build_sam(config.backbone, img_size=config.img_size, pretrained=False)
        system = SamMed2D(sam, config)
        load_official(system, state, str(config.checkpoint))
        return system
    sam = build_sam(config.backbone, checkpoint=config.checkpoint, img_size=config.img_size, pretrained=pretrained)
    return SamMed2D(sam, config)


def breakdown(system: SamMed2D) -> dict[str, int]:
    return trainable_breakdown(system, {
        "adapters": lambda n: f".mlp_parallel.{SLOT_KEY}." in n,
        "prompt encoder": lambda n: n.startswith("prompt_encoder."),
        "mask decoder": lambda n: n.startswith("mask_decoder."),
    })


SPEC = SystemSpec(name="sam_med2d", cls=SamMed2D,
                  description="SAM-Med2D: adapters beside every MLP + trained prompt encoder and mask decoder; box, "
                              "point and mask prompts, iterative clicks",
                  config=SamMed2DConfig, build=build_sammed2d, breakdown=breakdown, objective="iterative_clicks",
                  vit_size=256)
