"""SAM's mask decoder: a two-way transformer trunk, an up-scaling head and per-token hypernetworks.

State-dict keys and the constructor follow segment-anything (``iou_token``, ``mask_tokens``,
``output_upscaling.{0,1,3}``, ``output_hypernetworks_mlps.N.layers.M``, ``iou_prediction_head.layers.M``,
``transformer.*``), so the ``mask_decoder.*`` tensors of SAM, LiteMedSAM and MobileSAM checkpoints load strictly.

The trunk is split in two public steps that other decoders reuse (the I-MedSAM implicit decoder reads the
up-scaled image tokens instead of the hypernetwork masks):

* :meth:`MaskDecoder.run_transformer` -> ``tokens_out (B, T, C)``, ``image_tokens_out (B, C, h, w)``;
* :meth:`MaskDecoder.upscale` -> ``(B, C/8, 4h, 4w)``.

Batching: ``B`` is the number of prompts (the batch of the sparse embeddings). The image embedding has batch 1
(one image shared by all prompts, broadcast without copying the embedding ``B`` times) or batch ``B`` (one
prompt per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imedsam.errors import ImedsamError
from imedsam.sam.common import LayerNorm2d
from imedsam.sam.dense import Linear

__all__ = ["MLP", "MaskDecoder", "upscale_channels_last"]

#: Modules applied element by element: they run on the channels-last tensor as they are.
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Identity)


def _is_pixel_shuffle_deconv(layer: nn.Module) -> bool:
    """A ``ConvTranspose2d`` with kernel 2, stride 2, no padding, groups or dilation (SAM's up-scaling)."""
    return (isinstance(layer, nn.ConvTranspose2d) and layer.kernel_size == (2, 2) and layer.stride == (2, 2)
            and layer.padding == (0, 0) and layer.output_padding == (0, 0) and layer.dilation == (1, 1)
            and layer.groups == 1 and layer.padding_mode == "zeros")


def upscale_channels_last(layers: nn.Sequential, x: Tensor, *, interleave_last: bool = True) -> Tensor:
    """``layers(x)`` for SAM's up-scaling head, computed on channels-last tokens; ``x`` (B, C, h, w), any strides.

    A ``ConvTranspose2d`` with kernel 2 and stride 2 writes each input pixel's four output pixels from that pixel
    alone: ``out[:, o, 2i+a, 2j+b] = bias[o] + sum_c x[:, c, i, j] W[c, o, a, b]``. So it is ONE matrix product
    ``(B h w, C) @ (C, 4 C')`` whose columns, ordered (a, b, o), are then interleaved into the doubled grid;
    ``LayerNorm2d`` is a layer norm over the last axis, activations apply element by element. On a CPU this
    avoids oneDNN's deconvolution and its reorders back to NCHW (the largest part of a prompt's decode on
    LiteMedSAM) and the six passes of the NCHW layer norm. Same function up to float rounding (tests compare);
    differentiable. Returns (B, C', f h, f w) with channels-last strides (``.permute(0, 2, 3, 1)`` is
    contiguous). A head with any other layer runs as the plain ``Sequential`` (4-D, whatever
    ``interleave_last``).

    ``interleave_last=False`` leaves the last doubling's 2x2 blocks where the product wrote them: (B, h', w', 2,
    2, C') with output pixel (2i + a, 2j + b) at ``[:, i, j, a, b]`` (h' = f h / 2). A caller that reduces the
    channels next (SAM's hypernetwork product) interleaves its few outputs instead of the C' channels.
    """
    if not all(_is_pixel_shuffle_deconv(m) or isinstance(m, (LayerNorm2d, *_ELEMENTWISE)) for m in layers):
        return layers(x)
    last = max((i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)), default=-1)
    y = x.permute(0, 2, 3, 1)  # (B, h, w, C): a view when x came channels-last from the transformer
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.ConvTranspose2d):
            b, h, w, cin = y.shape
            cout = layer.out_channels
            weight = layer.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # columns (a, b, o)
            bias = layer.bias.repeat(4) if layer.bias is not None else None
            y = F.linear(y.reshape(b * h * w, cin), weight.t(), bias).view(b, h, w, 2, 2, cout)
            if i != last or interleave_last:
                y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)
        elif isinstance(layer, LayerNorm2d):
            y = F.layer_norm(y, (y.shape[-1],), layer.weight.to(y.dtype), layer.bias.to(y.dtype), layer.eps)
        else:
            y = layer(y)
    return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (not after the last); keys ``layers.M``.

    Args:
        input_dim, hidden_dim, output_dim: widths of the first input, the hidden layers and the output.
        num_layers: number of linear layers (>= 1).
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ImedsamError(f"MLP num_layers={num_layers} must be >= 1 (e.g. iou_head_depth=3)")
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        """``(..., input_dim) -> (..., output_dim)``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predict mask logits and IoU scores from an image embedding and prompt embeddings.

    Args:
        transformer_dim: channels ``C`` of tokens and image embedding (256 in SAM); a multiple of 8.
        transformer: the trunk, normally :class:`imedsam.sam.transformer.TwoWayTransformer`, called as
            ``transformer(image (B, C, h, w), pe (1 or B, C, h, w), tokens (B, T, C)) -> (tokens, image (B, hw, C))``.
        num_multimask_outputs: masks returned when ``multimask_output=True`` (3 in SAM); one more mask token
            exists for the single-mask output.
        activation: activation class of the up-scaling head.
        iou_head_depth: layers of the IoU-prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU-prediction MLP.
        upscale_channels: output channels of the up-scaling head's transposed convolutions (each doubles the grid;
            LayerNorm2d + activation after every one but the last, the activation after the last). Default
            ``(C/4, C/8)``, SAM's 4x head (keys ``output_upscaling.{0,1,3}``); MA-SAM's progressive 16x head is
            ``(64, 32, 16, 8)`` (keys ``output_upscaling.{0,1,3,4,6,7,9}``). The hypernetworks output the last
            width.

    Output tokens are ordered ``[iou_token, mask_tokens[0..num_multimask_outputs], sparse prompts...]``, so
    ``T = 1 + (num_multimask_outputs + 1) + n``.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        upscale_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if transformer_dim <= 0 or transformer_dim % 8:
            raise ImedsamError(f"transformer_dim={transformer_dim} must be a positive multiple of 8 (e.g. 256)")
        if num_multimask_outputs < 0:
            raise ImedsamError(f"num_multimask_outputs={num_multimask_outputs} must be >= 0 (SAM uses 3)")
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        widths = tuple(upscale_channels or (transformer_dim // 4, transformer_dim // 8))
        if not widths or min(widths) < 1:
            raise ImedsamError(f"upscale_channels={widths}: give one positive width per 2x up-scaling stage")
        self.upscale_factor = 2 ** len(widths)
        self.mask_channels = widths[-1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip((transformer_dim,) + widths[:-1], widths)):
            layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2))
            if i < len(widths) - 1:
                layers.append(LayerNorm2d(cout))
            layers.append(activation())
        self.output_upscaling = nn.Sequential(*layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, self.mask_channels, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    # ------------------------------------------------------------------ trunk

    def run_transformer(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Run the two-way transformer on the output tokens, the prompts and the image.

        Args:
            image_embeddings: ``(1 or B, C, h, w)`` from the image encoder; batch 1 is shared by all prompts.
            image_pe: ``(1 or B, C, h, w)`` dense positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: ``(B, n, C)`` point/box tokens; ``B`` is the number of prompts.
            dense_prompt_embeddings: ``(B or 1, C, h, w)`` mask embedding or ``no_mask_embed`` broadcast.

        Returns:
            ``tokens_out`` ``(B, T, C)`` with ``T = 1 + num_mask_tokens + n`` (index 0 is the IoU token,
            ``1..num_mask_tokens`` the mask tokens); ``image_tokens_out`` ``(B, C, h, w)``.
        """
        c = self.transformer_dim
        if sparse_prompt_embeddings.ndim != 3 or sparse_prompt_embeddings.shape[-1] != c:
            raise ImedsamError(
                f"sparse_prompt_embeddings have shape {tuple(sparse_prompt_embeddings.shape)}; expected (B, n, {c})"
            )
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.ndim != 4 or image_embeddings.shape[1] != c or image_embeddings.shape[0] not in (1, b):
            raise ImedsamError(
                f"image_embeddings have shape {tuple(image_embeddings.shape)}; expected (1 or {b}, {c}, h, w): "
                "one embedding shared by all prompts or one per prompt"
            )
        h, w = image_embeddings.shape[-2:]
        if dense_prompt_embeddings.ndim != 4 or tuple(dense_prompt_embeddings.shape[1:]) != (c, h, w) or (
            dense_prompt_embeddings.shape[0] not in (1, b)
        ):
            raise ImedsamError(
                f"dense_prompt_embeddings have shape {tuple(dense_prompt_embeddings.shape)}; expected "
                f"({b}, {c}, {h}, {w}) to match the image embedding"
            )
        if image_pe.ndim != 4 or tuple(image_pe.shape[1:]) != (c, h, w) or image_pe.shape[0] not in (1, b):
            raise ImedsamError(
                f"image_pe has shape {tuple(image_pe.shape)}; expected (1, {c}, {h}, {w}) "
                "(PromptEncoder.get_dense_pe() for this image-embedding size)"
            )

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings + dense_prompt_embeddings  # broadcasting shares a batch-1 embedding
        if src.shape[0] != b:  # image and dense prompt both of batch 1 while B > 1 prompts
            src = src.expand(b, -1, -1, -1)
        tokens_out, image_tokens = self.transformer(src, image_pe, tokens)
        image_tokens_out = image_tokens.transpose(1, 2).unflatten(2, (h, w))  # a channels-last view, no copy
        return tokens_out, image_tokens_out

    def upscale(self, image_tokens_out: Tensor) -> Tensor:
        """Up-scale the transformer's image tokens: ``(B, C, h, w) -> (B, C', f h, f w)`` (``output_upscaling``;
        SAM: ``C' = C/8``, ``f = 4``), computed channels-last (:func:`upscale_channels_last`); the result has
        channels-last strides."""
        return upscale_channels_last(self.output_upscaling, image_tokens_out)

    # ------------------------------------------------------------------ SAM heads

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All ``num_mask_tokens`` masks ``(B, num_mask_tokens, 4h, 4w)`` logits and IoU ``(B, num_mask_tokens)``.

        Arguments as :meth:`run_transformer`.
        """
        tokens_out, image_tokens_out = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        upscaled = upscale_channels_last(self.output_upscaling, image_tokens_out, interleave_last=False)
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, num_mask_tokens, C/8)
        t = self.num_mask_tokens
        if upscaled.dim() == 6:  # (B, h', w', 2, 2, C/8): reduce the channels, then interleave the T masks
            b, hh, ww, _, _, c8 = upscaled.shape
            blocks = upscaled.reshape(b, hh * ww * 4, c8) @ hyper_in.transpose(1, 2)  # (B, h' w' 4, T)
            masks = blocks.view(b, hh, ww, 2, 2, t).permute(0, 5, 1, 3, 2, 4).reshape(b, t, 2 * hh, 2 * ww)
        else:
            b, c8, hu, wu = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c8, hu * wu)).reshape(b, t, hu, wu)
        iou_pred = self.iou_prediction_head(tokens_out[:, 0, :])
        return masks, iou_pred

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks for ``B`` prompts.

        Args:
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings: see
                :meth:`run_transformer`.
            multimask_output: True returns masks ``1..num_multimask_outputs`` (the ambiguity-aware outputs),
                False returns mask 0 only, as SAM.

        Returns:
            ``masks`` ``(B, num_multimask_outputs or 1, 4h, 4w)`` logits (threshold at 0) and ``iou_pred``
            ``(B, num_multimask_outputs or 1)``.
        """
        if multimask_output and self.num_multimask_outputs == 0:
            raise ImedsamError("multimask_output=True needs num_multimask_outputs > 0; pass multimask_output=False")
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]
