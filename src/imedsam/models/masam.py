"""MA-SAM assembled: a SAM-family backbone + FacT on q/v + two 3-D adapters per block + a multi-class,
prompt-free mask decoder with progressive up-sampling (systems.md §C).

Data flow (B stacks of D adjacent slices, slice index inner; systems.md §C.10)::

    stacks (B, D, 3, S, S) -> (B*D, 3, S, S) --encoder + FacT(q, v) + 3-D adapters (mix the D slices)--> (B*D, C, h, w)
    no prompt (sparse: none, dense: no_mask_embed) or one box per slice --mask decoder, num_classes + 1 mask
    tokens, transformer trained--> up-scaling to the input resolution --> logits (B*D, num_classes + 1, S, S)
    softmax over classes: one pass gives every class

Where the adapters sit: FacT at the ``qkv`` insertion point of every attention block, one shared ``(U, V)`` pair
per token width (the ViT has one width; LiteMedSAM's TinyViT three: 128, 160, 320) and a per-block core per
projection; the 3-D adapters in the ``pre_attn`` and ``post_attn`` slots of every attention block. On TinyViT the
slice mixing therefore happens in the 10 attention blocks of stages 1-3 (grids 128², 64², 64² at 256 px); the
MBConv stage 0 and the patch-merging layers see the slices independently, as the ViT's patch embedding does.

Up-sampling: ``log2(S / grid)`` transposed-convolution stages with widths ``C/4, C/8, C/16, C/32`` (MA-SAM's
``64, 32, 16, 8`` at 512 px on a ViT: 16x). LiteMedSAM's 64² grid at 256 px needs two stages, exactly SAM's own
head, whose pretrained weights are kept; wider heads start fresh. The mask tokens, hypernetworks and IoU head
always start fresh (their count changes), the two-way transformer and the IoU token come from the checkpoint.

Stacks run across the file's third axis ``k`` (arrays ``(D, H, W) = (k, j, i)``), or with ``stack_axes``
``[k, j, i]`` (isotropic volumes) across each axis: training draws each stack across one of them
(:class:`imedsam.data.stacks.StacksDataset`) and :meth:`MASAM.predict_volume` averages the axes' probability
volumes on the input grid (tri-planar; :mod:`imedsam.io.slicing` lays each axis's slices out).

``mode: reference`` is MA-SAM's code: 3-D adapters of width 384 with ``up`` not zero-initialised. On ViT-B at
512², rank 32 and 12 classes that is exactly 30,142,361 trainable parameters, on ViT-H 96,811,929 (``imedsam info
--model ma_sam --backbone sam_vit_h --mode reference --num-classes 12``). ``paper`` (default) uses width 64 and
zero-initialised ``up`` (the adapted encoder starts as the pretrained one).

Released MA-SAM checkpoints hold only the tuned tensors (``q_FacTs_NNN``, ``image_encoder.FacTu``,
``image_encoder.ImageEncoderViT.blocks.N.Block.adapter_*``, the prompt encoder and the mask decoder): the frozen
weights come from the official SAM checkpoint (``model.checkpoint``); :func:`load_official` maps every key.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from imedsam.errors import ImedsamError
from imedsam.models.base import DecodeResult, Prompts, SegmentationSystem, trainable_breakdown
from imedsam.models.config import Strict, SystemConfig
from imedsam.models.spec import SystemSpec
from imedsam.models.views import FlipView, mean_over_views
from imedsam.peft.adapter3d import SLOT_KEY, attach_adapter3d
from imedsam.peft.backbone import attention_blocks, block_width, freeze_backbone
from imedsam.peft.fact import FacTFactors, attach_fact
from imedsam.sam.build import build_sam, get_spec
from imedsam.sam.mask_decoder import MaskDecoder
from imedsam.sam.model import SamModel
from imedsam.sam.prepare import PreparedImage, restore_logits

log = logging.getLogger(__name__)


class MASAMPeftConfig(Strict):
    """FacT and the 3-D adapters; ``null`` fields follow the mode (paper / reference)."""

    fact_rank: int = Field(32, ge=1, description="FacT rank r (MA-SAM: 32)")
    fact_scale: float = Field(1.0, description="FacT scale s")
    fact_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the FacT core's output")
    adapter_dim: int | None = Field(None, ge=1, description="3-D adapter width; null: paper 64, reference 384")
    kernel: tuple[int, int, int] = Field((3, 1, 1), description="3-D adapter kernel (slices, rows, columns)")
    zero_init_up: bool | None = Field(None, description="3-D adapters start at 0; null: paper true, reference false")
    positions: tuple[Literal["pre_attn", "post_attn"], ...] = Field(("pre_attn", "post_attn"), min_length=1,
                                                                    description="3-D adapters before and/or after "
                                                                                "attention")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(k < 1 or k % 2 == 0 for k in v):
            raise ValueError(f"{list(v)}: odd sizes, e.g. [3, 1, 1]")
        return v


class MASAMDecoderConfig(Strict):
    num_classes: int = Field(1, ge=1, description="foreground classes (the decoder has num_classes + 1 masks)")
    prompt: Literal["none", "box"] = Field("none", description="automatic (none) or one box per slice")


class MASAMConfig(SystemConfig):
    """MA-SAM: ``peft`` (FacT + 3-D adapters), ``decoder`` (classes, prompt) and the stack depth D."""

    system: Literal["ma_sam"] = "ma_sam"
    stack_depth: int = Field(5, ge=1, description="adjacent slices per stack (MA-SAM: 5); odd")
    peft: MASAMPeftConfig = MASAMPeftConfig()
    decoder: MASAMDecoderConfig = MASAMDecoderConfig()
    stack_axes: tuple[Literal["k", "j", "i"], ...] = Field(
        ("k",), min_length=1,
        description="file axes the stacks run across: k (the third: axial for most CT/MR); with j and i too, "
                    "training draws each stack across one of them and inference averages the probabilities over "
                    "all (tri-planar; for isotropic volumes)")

    @field_validator("stack_axes")
    @classmethod
    def _distinct_axes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)}: each axis once, e.g. [k] or [k, j, i]")
        return v

    @field_validator("stack_depth")
    @classmethod
    def _odd_depth(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"{v}: an odd number of slices, centred on the predicted slice")
        return v


def upscale_channels(dim: int, img_size: int, grid: int) -> tuple[int, ...]:
    """Widths of the head that takes the ``grid`` embedding to the ``img_size`` input: C/4, C/8, ... per 2x."""
    ratio = img_size // grid
    stages = int(round(math.log2(ratio)))
    if ratio < 2 or 2 ** stages != ratio:
        raise ImedsamError(f"ma_sam: input {img_size} is not a power-of-two multiple of the {grid}² embedding")
    return tuple(max(dim // 2 ** (k + 2), 1) for k in range(stages))


class MASAM(SegmentationSystem):
    """MA-SAM on any SAM-family backbone (module docstring)."""

    name: ClassVar[str] = "ma_sam"
    prompt_types: ClassVar[frozenset[str]] = frozenset()
    prompt_free: ClassVar[bool] = True
    val_protocols: ClassVar[tuple[str, ...]] = ()

    def __init__(self, sam: SamModel, config: MASAMConfig) -> None:
        super().__init__()
        self.config = config
        self.stack_depth = config.stack_depth
        self.prompt_types, self.prompt_free = self.prompts_for(config)  # type: ignore[misc]
        p = config.peft
        reference = config.mode == "reference"
        encoder = sam.image_encoder
        freeze_backbone(encoder)
        blocks = attention_blocks(encoder)
        self.fact = FacTFactors([block_width(b) for b in blocks], p.fact_rank).to(next(encoder.parameters()).device)
        attach_fact(encoder, self.fact, scale=p.fact_scale, dropout=p.fact_dropout)
        attach_adapter3d(encoder, hidden=p.adapter_dim or (384 if reference else 64), kernel=p.kernel,
                         zero_init_up=(not reference) if p.zero_init_up is None else p.zero_init_up,
                         positions=p.positions)
        self.image_encoder = encoder
        self.prompt_encoder = sam.prompt_encoder.requires_grad_(True)
        old = sam.mask_decoder
        dim = old.transformer_dim
        grid = sam.prompt_encoder.image_embedding_size[0]
        widths = upscale_channels(dim, sam.preprocess.img_size, grid)
        self.mask_decoder = MaskDecoder(transformer_dim=dim, transformer=old.transformer,
                                        num_multimask_outputs=config.decoder.num_classes,
                                        iou_head_depth=len(old.iou_prediction_head.layers),
                                        iou_head_hidden_dim=old.iou_prediction_head.layers[0].out_features,
                                        upscale_channels=widths).to(next(old.parameters()).device)
        with torch.no_grad():
            self.mask_decoder.iou_token.weight.copy_(old.iou_token.weight)
            if widths == (dim // 4, dim // 8):  # SAM's own head: keep its pretrained weights
                self.mask_decoder.output_upscaling.load_state_dict(old.output_upscaling.state_dict())
        self.mask_decoder.requires_grad_(True)
        self.preprocess = sam.preprocess

    @classmethod
    def prompts_for(cls, config: MASAMConfig) -> tuple[frozenset[str], bool]:
        """Prompt-free, or one box per slice for the box-prompted variant (``decoder.prompt: box``)."""
        return (frozenset({"box"}), False) if config.decoder.prompt == "box" else (frozenset(), True)

    @property
    def num_classes(self) -> int:
        return self.config.decoder.num_classes

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int] | None = None,
               num_slices: int = 1) -> torch.Tensor:
        """``(B*D, 3, S, S)`` stacks of ``num_slices`` adjacent slices (slice index inner) -> ``(B*D, C, h, w)``.
        The default, 1, treats every image alone (its 3-D adapters then see one slice between zero padding)."""
        return self.image_encoder(images, valid_hw=valid_hw, num_slices=num_slices)

    def class_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, h, w)`` embeddings (and one box per image, or none) -> ``(N, num_classes + 1, S', S')`` logits
        at the head's resolution (the input's), class 0 = background."""
        n = embeddings.shape[0]
        if boxes is not None:
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes.reshape(n, 4), masks=None)
        else:
            sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
            sparse = sparse.expand(n, -1, -1)
            dense = dense.expand(n, -1, -1, -1)
        masks, _ = self.mask_decoder.predict_masks(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        return masks

    def decode(self, embeddings: torch.Tensor, prepared: PreparedImage, prompts: Prompts, *,
               multimask: bool = False, size: tuple[int, int] | None = None,
               uncertainty: bool = False, seed: int = 0) -> DecodeResult:
        """One image (its stack's centre slice embedding): every class's logits on the requested grid
        ``(1, num_classes + 1, H_o, W_o)``; scores = the mean softmax probability of each class where it wins."""
        if uncertainty:
            raise ImedsamError("--uncertainty: MA-SAM's decoder gives no uncertainty map; use --model imedsam")
        logits = self.class_logits(embeddings, prompts.boxes)
        out = restore_logits(logits, prepared, size)
        prob = torch.softmax(out, dim=1)
        win = prob.argmax(1, keepdim=True)
        scores = torch.stack([prob[:, k][win[:, 0] == k].mean() if bool((win == k).any())
                              else prob.new_zeros(()) for k in range(out.shape[1])])[None]
        return DecodeResult(logits=out, scores=scores)

    @property
    def box_prompted(self) -> bool:
        """The box-prompted variant (``decoder.prompt: box``): every slice of a stack takes the scan's box."""
        return self.config.decoder.prompt == "box"

    def stack_logits(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D, 3, S, S)`` normalised stacks -> ``(B, D, num_classes + 1, S', S')`` class logits, the D slices
        of each stack seen together by the 3-D adapters. ``boxes``: ``(B, 4)`` half-open xyxy boxes in
        encoder-input pixels (0..S), one per stack and given to each of its slices: required by the
        box-prompted variant, refused by the prompt-free one."""
        b, d = images.shape[:2]
        if self.box_prompted and boxes is None:
            raise ImedsamError("ma_sam: this model was built box-prompted (decoder.prompt: box); give a box per "
                               "stack (--box3d on a volume)")
        if boxes is not None and not self.box_prompted:
            raise ImedsamError("ma_sam: this model is prompt-free (decoder.prompt: none); it takes no box")
        emb = self.encode(images.reshape(b * d, *images.shape[2:]), num_slices=d)
        per_slice = None if boxes is None else boxes.reshape(b, 1, 4).expand(b, d, 4).reshape(b * d, 4)
        logits = self.class_logits(emb, per_slice)
        return logits.reshape(b, d, *logits.shape[1:])

    @torch.inference_mode()
    def predict_volume(self, volume: torch.Tensor | np.ndarray, *, device: torch.device | str = "cpu",
                       amp_dtype: torch.dtype | None = None, stride: int = 1,
                       box3d: tuple[float, ...] | None = None,
                       on_stack: Callable[[int, int], None] | None = None,
                       views: tuple[FlipView, ...] = (FlipView(),),
                       axes: tuple[str, ...] | None = None) -> torch.Tensor:
        """Class probabilities of a uint8 ``(D, H, W)`` display volume (systems.md §C.7): a stack of
        ``stack_depth`` slices centred on every ``stride``-th slice (edges repeated; the last slice always a
        centre; ``stride`` at most the stack depth, so that every slice is in a stack), each slice resized to the
        encoder input S x S as in training (:class:`imedsam.data.stacks.StacksDataset`), its softmax
        probabilities resized back to the slice's size and averaged over every stack that holds the slice.
        Returns float32 ``(num_classes + 1, D, H, W)`` on the CPU; ``argmax(0)`` is the label volume.

        ``axes``: the file axes the stacks run across (:mod:`imedsam.io.slicing`; default the model's
        ``stack_axes``, ``("k",)`` unless it was trained tri-planar): the probabilities of each axis's pass are
        mapped back onto the ``(D, H, W)`` grid and averaged over the axes with equal weight.

        ``box3d``: the box-prompted variant's prompt (and only its), ``(i0, j0, k0, i1, j1, k1)`` half-open on
        the ``(D, H, W) = (k, j, i)`` array (the order of ``--box3d``): stacks are centred on the slices of the
        box's range along each axis, each slice given the box's in-plane extent, and only those slices are
        predicted (every other slice, and nothing outside the box's range, is background: probability 1 for class
        0). ``on_stack(done, total)`` is called after each stack, counted over all axes (progress bars).
        ``views``: flip test-time augmentation (:func:`imedsam.models.views.parse_tta`): every stack is also
        predicted flipped in-plane (its box flipped with it), the logits flipped back and averaged over the views
        before the softmax; each view costs one more pass of every stack."""
        from imedsam.io.slicing import across, back, box_across

        self.check_stack_stride(stride)
        axes = self.check_stack_axes(axes)
        vol = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
        self._volume_prompt(box3d, tuple(vol.shape))  # the box checked against the volume as given
        passes = []
        for axis in axes:
            moved = across(vol, axis)
            lo, hi, box = self._volume_prompt(None if box3d is None else box_across(box3d, axis),
                                              tuple(moved.shape))
            centres = list(range(lo, hi, stride))
            if centres[-1] != hi - 1:
                centres.append(hi - 1)
            passes.append((axis, moved, lo, hi, box, centres))
        total_stacks, done = sum(len(p[-1]) for p in passes), 0

        def step(_d: int, _t: int) -> None:
            nonlocal done
            done += 1
            if on_stack is not None:
                on_stack(done, total_stacks)

        probs = None
        for axis, moved, lo, hi, box, centres in passes:
            p = back(self._predict_across(moved, lo, hi, box, centres, device=device, amp_dtype=amp_dtype,
                                          views=views, on_stack=step), axis)
            probs = p if probs is None else probs.add_(p)
        return (probs if len(passes) == 1 else probs.div_(len(passes))).contiguous()

    def _predict_across(self, vol: torch.Tensor, lo: int, hi: int, box: torch.Tensor | None, centres: list[int],
                        *, device, amp_dtype, views: tuple[FlipView, ...],
                        on_stack: Callable[[int, int], None]) -> torch.Tensor:
        """:meth:`predict_volume` across the first axis of the float ``(n, H, W)`` array ``vol``: stacks centred
        on ``centres`` (inside ``[lo, hi)``, the slices predicted), ``box`` the ``(1, 4)`` box in encoder-input
        pixels or None. Returns ``(num_classes + 1, n, H, W)``."""
        from imedsam.runtime import autocast

        depth = self.stack_depth
        n, height, width = vol.shape
        size = self.preprocess.img_size
        total = torch.zeros(self.num_classes + 1, n, height, width)
        count = torch.zeros(n)
        half = depth // 2
        resized = F.interpolate(vol[:, None], size=(size, size), mode="bilinear", align_corners=False)  # once
        view_boxes = [None if box is None else  # each view's box, the same for every stack
                      torch.as_tensor(view.box(box[0].numpy(), (size, size)), dtype=box.dtype)[None].to(device)
                      for view in views]
        for done, centre in enumerate(centres, 1):
            idx = torch.clamp(torch.arange(centre - half, centre + half + 1), 0, n - 1)
            x = self.preprocess.normalize_tensor(resized[idx].expand(-1, 3, -1, -1).to(device))
            restored = []
            for view, bv in zip(views, view_boxes):
                xv = torch.flip(x, [a - 2 for a in view.axes]) if view.axes else x
                with autocast(torch.device(device), amp_dtype):
                    out = (self.stack_logits(xv[None])[0] if bv is None
                           else self.stack_logits(xv[None], bv)[0]).float()  # (depth, K + 1, S', S')
                restored.append(view.restore(out))
            logits = mean_over_views(restored)
            prob = torch.softmax(F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False),
                                 dim=1).cpu()
            for j, z in enumerate(idx.tolist()):
                if lo <= z < hi:
                    total[:, z] += prob[j]
                    count[z] += 1
            on_stack(done, len(centres))
        total[0, count == 0] = 1.0  # slices outside the box's range: background
        return total / count.clamp(min=1)[None, :, None, None]

    def check_stack_axes(self, axes: tuple[str, ...] | None) -> tuple[str, ...]:
        """``predict_volume``'s ``axes`` (``--stack-axes``; None: the model's ``stack_axes``), checked."""
        from imedsam.io.slicing import check_axes

        return tuple(self.config.stack_axes) if axes is None else check_axes(axes)

    def check_stack_stride(self, stride: int) -> None:
        """``predict_volume``'s ``stride`` (``--stack-stride``): 1 to the stack depth, so that every slice is in
        a stack."""
        if not 1 <= stride <= self.stack_depth:
            raise ImedsamError(f"--stack-stride: {stride} must be between 1 and the model's stack depth "
                               f"{self.stack_depth} (a larger stride leaves slices in no stack)")

    def _volume_prompt(self, box3d, shape: tuple[int, int, int]) -> tuple[int, int, torch.Tensor | None]:
        """[lo, hi) slices to predict and the ``(1, 4)`` box in encoder-input pixels (None: prompt-free)."""
        n, height, width = shape
        if box3d is None:
            if self.box_prompted:
                raise ImedsamError("ma_sam: this model was trained box-prompted (decoder.prompt: box); give "
                                   "--box3d I0 J0 K0 I1 J1 K1 (or --prompt box3d to evaluate)")
            return 0, n, None
        if not self.box_prompted:
            raise ImedsamError("--box3d: this MA-SAM model is prompt-free (decoder.prompt: none); use --auto")
        b = [float(v) for v in box3d]
        if len(b) != 6 or not (0 <= b[0] < b[3] <= width and 0 <= b[1] < b[4] <= height and 0 <= b[2] < b[5] <= n):
            raise ImedsamError(f"--box3d: {b} is not a half-open box inside the {width}x{height}x{n} (IxJxK) volume")
        size = self.preprocess.img_size
        box = torch.tensor([[b[0] * size / width, b[1] * size / height, b[3] * size / width, b[4] * size / height]])
        return int(np.floor(b[2])), int(np.ceil(b[5])), box

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Mask decoder + prompt encoder at ``optim.lr_decoder``; FacT and the 3-D adapters at ``optim.lr_adapter``."""
        groups: dict[str, list[torch.nn.Parameter]] = {"decoder": [], "adapters": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                decoder = name.startswith(("mask_decoder.", "prompt_encoder."))
                groups["decoder" if decoder else "adapters"].append(param)
        return groups


# ----------------------------------------------------------------------------------------- official checkpoints

_FACT_CORE = re.compile(r"^(q|v)_FacTs_(\d+)$")
_ADAPTER = re.compile(r"^image_encoder\.ImageEncoderViT\.blocks\.(\d+)\.Block\."
                      r"adapter_(linear_down|linear_up|conv|norm)(_2)?\.(weight|bias)$")
_ADAPTER_PART = {"linear_down": "down", "linear_up": "up", "conv": "conv", "norm": "norm"}


def map_official_keys(state: Mapping[str, torch.Tensor], system: MASAM) -> dict[str, torch.Tensor]:
    """MA-SAM's saved keys -> ours (module docstring); raises naming the first key it cannot place."""
    out = {}
    for key, value in state.items():
        if m := _FACT_CORE.match(key):
            out[f"image_encoder.blocks.{int(m.group(2))}.attn.qkv.cores.{m.group(1)}.weight"] = value
        elif key in ("image_encoder.FacTu.weight", "image_encoder.FacTv.weight"):
            d = value.shape[1] if key.endswith("FacTu.weight") else value.shape[0]
            out[f"fact.factors.{d}.{'u' if 'FacTu' in key else 'v'}.weight"] = value
        elif m := _ADAPTER.match(key):
            slot = "post_attn" if m.group(3) else "pre_attn"
            out[f"image_encoder.blocks.{m.group(1)}.{slot}.{SLOT_KEY}.{_ADAPTER_PART[m.group(2)]}.{m.group(4)}"] = value
        elif key.startswith(("prompt_encoder.", "mask_decoder.")):
            out[key] = value
        else:
            raise ImedsamError(f"MA-SAM checkpoint key {key!r} has no place in ma_sam; is it an MA-SAM file?")
    return out


def load_official(system: MASAM, path) -> None:
    """Load the tuned tensors of a released MA-SAM checkpoint strictly: every tensor of the file is placed, and
    every trainable tensor of ``system`` is set (the frozen ones came from the SAM checkpoint)."""
    from imedsam.sam.checkpoint import read_state_dict

    state = map_official_keys(read_state_dict(path), system)
    own = system.state_dict()
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    unknown = sorted(set(state) - set(own))
    missing = sorted(trainable - set(state))
    shapes = [k for k in set(state) & set(own) if tuple(own[k].shape) != tuple(state[k].shape)]
    if unknown or missing or shapes:
        raise ImedsamError(f"--adapter: {path} does not match this ma_sam ({len(missing)} missing, e.g. {missing[:3]};"
                           f" {len(unknown)} unexpected, e.g. {unknown[:3]}; {len(shapes)} of another shape, e.g. "
                           f"{shapes[:3]}); build it with the checkpoint's backbone, rank and number of classes")
    system.load_state_dict(state, strict=False)
    log.info("loaded the MA-SAM checkpoint %s (%d tensors)", path, len(state))


def build_masam(config: MASAMConfig, *, pretrained: bool = True) -> MASAM:
    """MA-SAM on its backbone (SAM base weights loaded; FacT, adapters and the new decoder parts fresh)."""
    if config.img_size is None and get_spec(config.backbone).encoder == "vit":
        config = config.model_copy(update={"img_size": SPEC.vit_size})
    sam = build_sam(config.backbone, checkpoint=config.checkpoint, img_size=config.img_size, pretrained=pretrained)
    return MASAM(sam, config)


def breakdown(system: MASAM) -> dict[str, int]:
    return trainable_breakdown(system, {
        "FacT (U, V, cores)": lambda n: n.startswith("fact.") or ".attn.qkv.cores." in n,
        "3-D adapters": lambda n: f".{SLOT_KEY}." in n,
        "prompt encoder": lambda n: n.startswith("prompt_encoder."),
        "mask decoder": lambda n: n.startswith("mask_decoder."),
    })


SPEC = SystemSpec(name="ma_sam", cls=MASAM,
                  description="MA-SAM: FacT(q,v) + 3-D adapters over adjacent slices + multi-class prompt-free decoder",
                  config=MASAMConfig, build=build_masam, breakdown=breakdown, objective="multiclass_stacks",
                  vit_size=512,
                  options={"num_classes": "decoder.num_classes"})
