"""Inject I-MedSAM's adapters (LoRA on q/v + Frequency Adapter) into a SAM-family image encoder.

Nothing in :mod:`imedsam.sam` knows about adapters. A backbone is built and its official checkpoint loaded
into the *unmodified* model first; then :func:`inject_adapters` performs the surgery:

1. every encoder parameter is frozen (``requires_grad=False``), and every frozen ``BatchNorm`` layer (TinyViT) is
   pinned to evaluation behaviour (running statistics, no update, in ``train()`` mode too), so the frozen
   encoder never drifts and the adapter file alone describes what was trained;
2. the fused ``attn.qkv`` Linear of every selected attention block is replaced by
   :class:`~imedsam.peft.lora.LoRAQKV` (contiguous ``[q|k|v]`` layout for SAM's ViT, per-head interleaved for
   TinyViT), so the frozen weight moves to ``...attn.qkv.base.weight``;
3. with the frequency adapter on, the encoder is wrapped in :class:`FrequencyAdaptedViT` or
   :class:`FrequencyAdaptedTinyViT`, which adds a frequency stream (see below). Without it, the (modified)
   encoder itself is returned.

ViT (SAM ViT-B/L/H, systems.md §A.4)
------------------------------------
``F_0 = encoder.embed(frequency_image(x))`` uses the *same* frozen patch embedding and absolute position
embedding as the image tokens. Block ``i`` then runs::

    x   = x + attn(norm1(x))               (windowed or global, exactly as Block.forward, with LoRA)
    F_i = FA_i(F_{i-1})
    x   = x + mlp(norm2(x)) + scale * F_i

and the frozen neck maps the tokens to the image embedding. ``F`` never sees attention or the MLPs.

TinyViT (LiteMedSAM / MobileSAM)
--------------------------------
TinyViT has no single patch embedding and no position embedding: a convolutional stem (``patch_embed``), a
stage of MBConv blocks at full stem resolution (``layers[0]``), then three attention stages whose token grid and
width change at each ``PatchMerging`` (``downsample``). The frequency stream is placed as follows::

    F   = layers[0].downsample(patch_embed(frequency_image(x)))        stage-1 grid and width
    for each attention stage s = 1, 2, 3:
        for each block:   x = x + attn(windows(x)); x = local_conv(x)
                          F = FA(F);  x = x + mlp(x) + scale * F
        x = downsample_s(x);  F = downsample_s(F)                      (stages 1 and 2)

Why this placement:

* **Same frozen embedding, no new projection.** I-MedSAM embeds the frequency image with the image's own frozen
  patch embedding. In TinyViT the frozen operators that take pixels to stage-1 tokens, and stage-s tokens to
  stage-(s+1) tokens, are the stem and the ``PatchMerging`` layers; reusing them gives ``F`` the right grid and
  width at every attention stage without a learned projection (a learned C_s -> C_(s+1) map would cost more
  parameters than all the FAs together).
* **F skips the backbone's blocks.** In the ViT, ``F`` passes through the embedding and the FAs only, never
  through transformer blocks. The MBConv blocks of stage 0 are blocks, not embedding, so ``F`` skips them
  (``PatchMerging`` accepts the stem's width). This also keeps the frequency stream cheap: stage 0 runs at the
  stem's full resolution (256 x 256 x 64 for LiteMedSAM) and dominates TinyViT's cost; the stem and merges
  alone add a few per cent.
* **Parallel to the MLP, after local_conv.** As in the ViT, ``scale * F_i`` joins the residual stream in the
  same step as the MLP output, i.e. after the block's attention and depthwise ``local_conv``; one FA per
  attention block (10 for LiteMedSAM's depths 2, 6, 2), chained within and across stages.
* Stage 0 (MBConv) has no attention and gets neither LoRA nor an FA.

Block selection
---------------
``PeftConfig.lora_blocks`` selects LoRA blocks by index in the flat list of attention blocks (ViT: ``blocks``;
TinyViT: the blocks of ``layers[1]``, ``layers[2]``, ``layers[3]`` in order). The FA is in every block, because
its stream is chained.

Adapter files
-------------
:func:`adapter_state_dict` holds exactly the tensors with ``requires_grad=True`` (named as in the adapted
model); :func:`save_adapters` writes them with safetensors, the config as a JSON string in the file's metadata
(key ``"config"``), atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from imedsam.errors import ImedsamError
from imedsam.io.atomic import atomic_write
from imedsam.peft.frequency import FrequencyAdapter, frequency_image
from imedsam.peft.lora import TARGETS, LoRAQKV

logger = logging.getLogger(__name__)

__all__ = [
    "FrequencyAdaptedTinyViT",
    "FrequencyAdaptedViT",
    "PeftConfig",
    "adapter_state_dict",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "save_adapters",
    "trainable_parameters",
]

ADAPTER_FORMAT = "imedsam-adapters/1"


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PeftConfig:
    """What :func:`inject_adapters` adds. ``None`` fields take the default of ``mode``.

    ``mode="paper"`` (the corrected method, systems.md §A.19) and ``mode="reference"`` (the official code's
    behaviour, quirks included) differ in the defaults of:

    ============================ ========= ==========================================
    field                        paper     reference
    ============================ ========= ==========================================
    ``lora_gate``                False     True  (g = w . mean_tokens(x), no alpha/r)
    ``log_amplitude``            True      False
    ``fa_norm_trainable``        True      False (LN_f frozen at weight 1, bias 0)
    frequency-image grayscale    mean RGB  255 * channel 0 (bug §F.2)
    ============================ ========= ==========================================

    Attributes:
        mode: ``"paper"`` or ``"reference"``.
        lora_rank: LoRA rank; 0 disables LoRA.
        lora_alpha: LoRA scale numerator (update x alpha/rank); ``None`` = rank (scale 1, ``W + BA``).
        lora_dropout: dropout on the LoRA branch input.
        lora_targets: subset of ``("q", "k", "v")``.
        lora_gate: reference gate instead of alpha/rank.
        lora_blocks: ``"all"`` or indices into the flat list of attention blocks.
        frequency: add the frequency stream and one FA per attention block.
        fa_hidden: FA bottleneck width.
        fa_scale: factor on ``F_i`` where it joins the residual stream.
        fa_gate_init: ``None`` (I-MedSAM), or the initial value of a learnable per-block gate on ``F_i``
            (``0.0``: the adapted encoder equals the pretrained one at initialisation).
        fa_norm_trainable: train the FA's LayerNorm.
        log_amplitude: ``log1p`` the FFT amplitude before min-max.
    """

    mode: Literal["paper", "reference"] = "paper"
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_gate: bool | None = None
    lora_blocks: Literal["all"] | tuple[int, ...] = "all"
    frequency: bool = True
    fa_hidden: int = 4
    fa_scale: float = 0.5
    fa_gate_init: float | None = None
    fa_norm_trainable: bool | None = None
    log_amplitude: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "reference"):
            raise ImedsamError(f"peft mode must be 'paper' or 'reference', got {self.mode!r}")
        if int(self.lora_rank) < 0:
            raise ImedsamError(f"lora_rank must be >= 0 (0 disables LoRA), got {self.lora_rank}")
        if self.lora_alpha is not None and float(self.lora_alpha) <= 0:
            raise ImedsamError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ImedsamError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        if not targets or any(t not in TARGETS for t in targets):
            raise ImedsamError(f"lora_targets must be a non-empty subset of {TARGETS}, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", targets)
        blocks = self.lora_blocks
        if blocks != "all":
            if isinstance(blocks, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in blocks):
                raise ImedsamError(f"lora_blocks must be 'all' or a list of block indices, got {blocks!r}")
            object.__setattr__(self, "lora_blocks", tuple(sorted(set(blocks))))
        if int(self.fa_hidden) < 1:
            raise ImedsamError(f"fa_hidden must be >= 1, got {self.fa_hidden}")

    @property
    def reference(self) -> bool:
        return self.mode == "reference"

    @property
    def gate(self) -> bool:
        """Resolved ``lora_gate``."""
        return self.reference if self.lora_gate is None else bool(self.lora_gate)

    @property
    def log(self) -> bool:
        """Resolved ``log_amplitude``."""
        return (not self.reference) if self.log_amplitude is None else bool(self.log_amplitude)

    @property
    def norm_trainable(self) -> bool:
        """Resolved ``fa_norm_trainable``."""
        return (not self.reference) if self.fa_norm_trainable is None else bool(self.fa_norm_trainable)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists); :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeftConfig:
        """Build from a mapping; unknown keys raise :class:`ImedsamError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ImedsamError(f"unknown peft config key(s) {unknown}; known keys: {sorted(names)}")
        kwargs = dict(data)
        for key in ("lora_targets", "lora_blocks"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------- wrappers


class _FrequencyAdaptedEncoder(nn.Module):
    """Common part of the frequency-adapted wrappers: the frozen ``encoder`` and its ``adapters``.

    Attributes not found on the wrapper are looked up on the wrapped encoder (``img_size``, ``neck``, ...).
    """

    def __init__(self, encoder: nn.Module, adapters: Sequence[FrequencyAdapter], *, reference: bool,
                 log_amplitude: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapters = nn.ModuleList(adapters)
        self.reference = bool(reference)
        self.log_amplitude = bool(log_amplitude)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            encoder = self._modules.get("encoder")
            if encoder is None or name.startswith("_"):
                raise
            return getattr(encoder, name)

    def frequency_input(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        """The frequency image of the encoder input ``x`` (B,3,S,S) -> (B,3,S,S), see :func:`frequency_image`."""
        return frequency_image(x, reference=self.reference, log_amplitude=self.log_amplitude, valid_hw=valid_hw)

    def forward_tokens(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        """(B, 3, S, S) encoder input -> (B, out_chans, g, g) image embedding.

        ``valid_hw``: the un-padded ``(h, w)`` of the images inside ``x`` (one, or one per image) so that the
        frequency image ignores the padding; ``None`` uses the whole input.
        """
        raise NotImplementedError  # pragma: no cover


class FrequencyAdaptedViT(_FrequencyAdaptedEncoder):
    """SAM ``ImageEncoderViT`` + frequency stream: one :class:`FrequencyAdapter` per block (module docstring).

    Keys: ``encoder.*`` (the frozen encoder, LoRA inside ``encoder.blocks.<i>.attn.qkv``), ``adapters.<i>.*``.
    """

    def __init__(self, encoder: nn.Module, adapters: Sequence[FrequencyAdapter], *, reference: bool = False,
                 log_amplitude: bool = True) -> None:
        if len(adapters) != len(encoder.blocks):
            raise ImedsamError(f"FrequencyAdaptedViT needs one adapter per block: {len(encoder.blocks)} blocks, "
                               f"{len(adapters)} adapters")
        super().__init__(encoder, adapters, reference=reference, log_amplitude=log_amplitude)

    def forward_tokens(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        """(B, 3, S, S) -> tokens after the last block (B, S/p, S/p, C), before the neck."""
        enc = self.encoder
        tokens = enc.embed(x)  # validates the input shape first
        f = enc.embed(self.frequency_input(x, valid_hw))
        x = tokens
        for block, adapter in zip(enc.blocks, self.adapters):
            x = x + block.attention(block.norm1(x))
            f = adapter(f)
            x = x + block.mlp(block.norm2(x)) + adapter.merge(f)
        return x

    def forward(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        return self.encoder.neck(self.forward_tokens(x, valid_hw).permute(0, 3, 1, 2))


class FrequencyAdaptedTinyViT(_FrequencyAdaptedEncoder):
    """TinyViT + frequency stream: one :class:`FrequencyAdapter` per attention block (module docstring).

    Keys: ``encoder.*`` (the frozen TinyViT, LoRA inside ``...blocks.<j>.attn.qkv``), ``adapters.<i>.*`` with
    ``i`` the index in the flat list of attention blocks (stages 1, 2, 3 in order).
    """

    def __init__(self, encoder: nn.Module, adapters: Sequence[FrequencyAdapter], *, reference: bool = False,
                 log_amplitude: bool = True) -> None:
        n = len(_attention_blocks(encoder))
        if len(adapters) != n:
            raise ImedsamError(f"FrequencyAdaptedTinyViT needs one adapter per attention block: {n} blocks, "
                               f"{len(adapters)} adapters")
        super().__init__(encoder, adapters, reference=reference, log_amplitude=log_amplitude)

    def forward_tokens(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        """(B, 3, S, S) -> tokens after the last stage (B, g*g, C3), before the neck."""
        from imedsam.sam.tiny_vit import drop_path

        enc = self.encoder
        size = (enc.in_chans, enc.img_size, enc.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != size:
            raise ImedsamError(f"image: TinyViT expects input (B, {size[0]}, {size[1]}, {size[2]}), got "
                               f"{tuple(x.shape)}; resize/pad the image to {size[1]}x{size[2]} first")
        f = enc.patch_embed(self.frequency_input(x, valid_hw))
        if enc.layers[0].downsample is not None:
            f = enc.layers[0].downsample(f)
        else:  # no merge: tokens at the stem grid
            f = f.flatten(2).transpose(1, 2)
        x = enc.layers[0](enc.patch_embed(x))
        adapters = iter(self.adapters)
        for layer in enc.layers[1:]:
            for block in layer.blocks:
                adapter = next(adapters)
                h, w = block.input_resolution
                b, n, c = x.shape
                rate, training = block.drop_path_rate, block.training
                x = x + drop_path(block._window_attention(x), rate, training)
                x = block.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)
                f = adapter(f)
                x = x + drop_path(block.mlp(x), rate, training) + adapter.merge(f)
            if layer.downsample is not None:
                x = layer.downsample(x)
                f = layer.downsample(f)
        return x

    def forward(self, x: torch.Tensor, valid_hw: Any = None) -> torch.Tensor:
        enc = self.encoder
        x = self.forward_tokens(x, valid_hw)
        b, _, c = x.shape
        return enc.neck(x.transpose(1, 2).reshape(b, c, enc.grid_size, enc.grid_size))


# --------------------------------------------------------------------------------------------------- injection


def _encoder_kind(encoder: nn.Module) -> str:
    from imedsam.sam.tiny_vit import TinyViT
    from imedsam.sam.vit import ImageEncoderViT

    if isinstance(encoder, _FrequencyAdaptedEncoder) or any(isinstance(m, LoRAQKV) for m in encoder.modules()):
        raise ImedsamError("inject_adapters: this encoder already has adapters; inject into a fresh backbone")
    if isinstance(encoder, ImageEncoderViT):
        return "vit"
    if isinstance(encoder, TinyViT):
        return "tiny_vit"
    raise ImedsamError(f"inject_adapters supports ImageEncoderViT and TinyViT encoders, got {type(encoder).__name__}")


def _attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The attention blocks in order: ViT ``blocks``; TinyViT the blocks of ``layers[1:]``."""
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    return [block for layer in list(encoder.layers)[1:] for block in layer.blocks]


def _pin_batchnorm_eval(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook: a frozen BatchNorm always normalises with its running statistics and never updates them."""
    module.training = False


def inject_adapters(encoder: nn.Module, config: PeftConfig | None = None) -> nn.Module:
    """Freeze ``encoder`` and add the adapters described by ``config`` (module docstring).

    Args:
        encoder: an :class:`~imedsam.sam.vit.ImageEncoderViT` or :class:`~imedsam.sam.tiny_vit.TinyViT`, with
            its base weights already loaded. It is modified in place (frozen, qkv layers wrapped).
        config: the adapters; default ``PeftConfig()`` (paper mode).

    Returns:
        the frequency-adapted wrapper (:class:`FrequencyAdaptedViT` / :class:`FrequencyAdaptedTinyViT`) when
        ``config.frequency``, else ``encoder`` itself. Either maps (B, 3, S, S) -> (B, out_chans, g, g) like
        the original encoder; only the adapter parameters require grad. New modules are created on the device
        and dtype of the encoder's parameters.
    """
    config = PeftConfig() if config is None else config
    if not isinstance(config, PeftConfig):
        raise ImedsamError(f"inject_adapters: config must be a PeftConfig, got {type(config).__name__}")
    kind = _encoder_kind(encoder)
    encoder.requires_grad_(False)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_pin_batchnorm_eval)
    blocks = _attention_blocks(encoder)
    ref_param = next(encoder.parameters())
    factory = {"device": ref_param.device, "dtype": ref_param.dtype}

    if config.lora_rank > 0:
        selected = range(len(blocks)) if config.lora_blocks == "all" else config.lora_blocks
        bad = [i for i in selected if not 0 <= i < len(blocks)]
        if bad:
            raise ImedsamError(f"lora_blocks {bad} out of range: the encoder has {len(blocks)} attention blocks "
                               f"(0..{len(blocks) - 1})")
        for i in selected:
            attn = blocks[i].attn
            heads = {}
            if kind == "tiny_vit":
                heads = {"num_heads": attn.num_heads, "key_dim": attn.key_dim, "value_dim": attn.d}
            attn.qkv = LoRAQKV(attn.qkv, rank=config.lora_rank, alpha=config.lora_alpha,
                               dropout=config.lora_dropout, targets=config.lora_targets, gate=config.gate, **heads)
        alpha = config.lora_rank if config.lora_alpha is None else config.lora_alpha
        scaling = "gated" if config.gate else f"alpha/rank={alpha / config.lora_rank:g}"
        logger.info("LoRA rank %d on %s of %d/%d attention blocks (%s)", config.lora_rank,
                    "".join(config.lora_targets), len(selected), len(blocks), scaling)

    if not config.frequency:
        return encoder
    adapters = [
        FrequencyAdapter(_block_dim(block), hidden=config.fa_hidden, scale=config.fa_scale, skip=True,
                         norm_trainable=config.norm_trainable, gate_init=config.fa_gate_init).to(**factory)
        for block in blocks
    ]
    wrapper_cls = FrequencyAdaptedViT if kind == "vit" else FrequencyAdaptedTinyViT
    logger.info("frequency adapters: %d (hidden %d, scale %g, %s mode)", len(adapters), config.fa_hidden,
                config.fa_scale, config.mode)
    return wrapper_cls(encoder, adapters, reference=config.reference, log_amplitude=config.log)


def _block_dim(block: nn.Module) -> int:
    qkv = block.attn.qkv
    return qkv.in_features


# --------------------------------------------------------------------------------------------------- parameters


def trainable_parameters(module: nn.Module) -> dict[str, int]:
    """Count the parameters with ``requires_grad=True`` by group.

    Returns ``{"lora": A and B matrices, "lora_gate": gate vectors, "frequency_adapter": FA down/up (and LN_f
    when trainable), "other": anything else trainable (e.g. a prompt encoder), "total": the sum}``.
    """
    group_of: dict[int, str] = {}
    for m in module.modules():
        if isinstance(m, LoRAQKV):
            for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters()):
                group_of[id(p)] = "lora"
            if m.lora_gate is not None:
                for p in m.lora_gate.parameters():
                    group_of[id(p)] = "lora_gate"
        elif isinstance(m, FrequencyAdapter):
            for p in m.parameters():
                group_of[id(p)] = "frequency_adapter"
    counts = {"lora": 0, "lora_gate": 0, "frequency_adapter": 0, "other": 0}
    for p in module.parameters():
        if p.requires_grad:
            counts[group_of.get(id(p), "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus the buffers of trained modules (e.g. BatchNorm running statistics).

    A module's buffers belong to the adapter file when the module has parameters and all of them are trainable:
    the running statistics of a trained BatchNorm are part of what was learned, while a frozen module's buffers
    come with the base weights.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and all(p.requires_grad for p in params):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name in module._buffers and name not in module._non_persistent_buffers_set:
                    tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters with ``requires_grad=True`` and the buffers of trained modules
    (BatchNorm running statistics), detached, on their device."""
    return {name: t.detach() for name, t in _trained_tensors(model).items()}


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy adapter tensors into ``model``'s trainable parameters.

    The expected keys are those of :func:`adapter_state_dict(model) <adapter_state_dict>`. With ``strict`` a
    missing or unexpected key raises :class:`ImedsamError` naming them; otherwise the common keys are loaded.
    A shape mismatch always raises. Returns ``(missing, unexpected)``.
    """
    params = _trained_tensors(model)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise ImedsamError(f"adapter weights do not match the model ({'; '.join(parts)}); build the model with "
                           "the same peft config as the one the adapters were trained with")
    with torch.no_grad():
        for name in params.keys() & state_dict.keys():
            src, dst = state_dict[name], params[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ImedsamError(f"adapter weight {name!r} has shape {tuple(src.shape)}, the model expects "
                                   f"{tuple(dst.shape)}; build the model with the adapters' config")
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    return missing, unexpected


def save_adapters(path: str | os.PathLike[str], model: nn.Module,
                  config: Mapping[str, Any] | PeftConfig | None = None) -> Path:
    """Write the trainable tensors of ``model`` to a safetensors file, atomically; returns the path.

    ``config`` (a JSON-able mapping, or a :class:`PeftConfig`) is stored as a JSON string under the metadata key
    ``"config"``; :func:`load_adapters` returns it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    cfg = config.to_dict() if isinstance(config, PeftConfig) else dict(config or {})
    try:
        text = json.dumps(cfg, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ImedsamError(f"save_adapters: config for {path} is not JSON-serialisable ({exc})") from exc
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ImedsamError(f"save_adapters: the model has no trainable parameters to write to {path}")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT,
                                                                          "config": text}))
    logger.info("saved %d adapter tensors (%d values) to %s", len(tensors),
                sum(t.numel() for t in tensors.values()), path)
    return path


def load_adapters(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter file written by :func:`save_adapters`: ``(state_dict on CPU, config dict)``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ImedsamError(f"adapter file {path} not found; pass the adapter.safetensors of a training run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ImedsamError(f"adapter file {path} is not a readable safetensors file ({exc})") from exc
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as exc:
        raise ImedsamError(f"adapter file {path}: its 'config' metadata is not valid JSON ({exc})") from exc
    return state, config
