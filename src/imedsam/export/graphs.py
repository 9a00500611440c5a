"""The modules traced into ONNX graphs: thin wrappers over a system's own submodules, with ONNX-friendly inputs.

=================  ==========================================================  ====================================
graph              inputs                                                      outputs
=================  ==========================================================  ====================================
encoder            image (1, 3, S, S) [, valid_hw (2,) int64]                  image_embeddings (1, C, h, w)
decoder (SAM)      image_embeddings, point_coords (1, N, 2), point_labels      low_res_masks (1, M, 4h, 4w),
                   (1, N), mask_input (1, 1, 4h, 4w), has_mask_input (1,)      iou_predictions (1, M)
trunk (I-MedSAM)   the decoder's inputs                                        features (1, C/8, 4h, 4w)
                                                                               [, sam_prior (1, 1, 4h, 4w)]
implicit_coarse    features, coords (1, Q, 2)                                  coarse_logits (1, K, Q)
                                                                               [, uncertainty (1, K, Q)]
implicit_fine      features, coords (1, Q, 2)                                  fine_logits (1, K, Q)
=================  ==========================================================  ====================================

Prompts follow SAM's own ONNX export: ``point_coords`` are ``(x, y)`` in encoder-input pixels (the graph adds the
0.5 of the pixel centre), ``point_labels`` float 1 / 0 for points, -1 for the padding point SAM appends after
points when there is no box, 2 and 3 for the box's two corners; ``N`` is a dynamic axis. The mask prompt is used
when ``has_mask_input`` is 1 (``mask_input`` is then SAM low-res logits), else ``no_mask_embed``.
``low_res_masks`` are all ``M = num_multimask_outputs + 1`` mask tokens' logits over the S x S input (index 0 the
single-mask output, 1.. the multimask ones); choosing among them and resizing to the image happen outside, in the
same Python code as the PyTorch path. ``coords`` are ``(y, x)`` normalised pixel centres
(:mod:`imedsam.decoders.coords`), ``Q`` is dynamic; ``K`` is the number of classes. The MC-dropout masks of the
uncertainty are drawn at export from a seed and stored in ``implicit_coarse``.
"""

from __future__ import annotations

import torch
from torch import nn

from imedsam.decoders.coords import sample_features
from imedsam.decoders.implicit import ImplicitDecoder
from imedsam.decoders.ugs import mc_variance
from imedsam.sam.mask_decoder import MaskDecoder
from imedsam.sam.prompt_encoder import PromptEncoder


class EncoderGraph(nn.Module):
    """``image (1, 3, S, S) -> image_embeddings``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class FrequencyEncoderGraph(EncoderGraph):
    """``image, valid_hw (2,) int64 -> image_embeddings`` (encoders with I-MedSAM's frequency stream)."""

    def forward(self, image: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.encoder(image, valid_hw=valid_hw)


class PromptGraph(nn.Module):
    """SAM's prompt encoder on the ONNX prompt layout (module docstring); the same values as
    :class:`~imedsam.sam.prompt_encoder.PromptEncoder` on the same prompts."""

    def __init__(self, prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.register_buffer("dense_pe", prompt_encoder.get_dense_pe().detach().clone())

    def prompt_embeddings(self, point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                          has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``(1, N, C)`` and dense ``(1, C, h, w)`` prompt embeddings."""
        pe = self.prompt_encoder
        pos = pe.pe_layer.forward_with_coords(point_coords + 0.5, pe.input_image_size)
        lab = point_labels.unsqueeze(-1)
        sparse = torch.where(lab == -1, pe.not_a_point_embed.weight, pos)
        for i, embedding in enumerate(pe.point_embeddings):
            sparse = sparse + torch.where(lab == i, embedding.weight, 0.0)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * pe.mask_downscaling(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return sparse, dense


class SamDecoderGraph(PromptGraph):
    """Prompt encoder + SAM mask decoder: every mask token's low-res logits and predicted IoU."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__(prompt_encoder)
        self.mask_decoder = mask_decoder

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        sparse, dense = self.prompt_embeddings(point_coords, point_labels, mask_input, has_mask_input)
        return self.mask_decoder.predict_masks(image_embeddings, self.dense_pe, sparse, dense)


class ImplicitTrunkGraph(PromptGraph):
    """I-MedSAM's decoder trunk: prompt encoder + two-way transformer + ``output_upscaling`` -> U, and with
    ``sam_prior`` the backbone's own single-mask logits (:meth:`imedsam.models.imedsam.IMedSAM._features`)."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, sam_prior: bool) -> None:
        super().__init__(prompt_encoder)
        self.mask_decoder = mask_decoder
        self.sam_prior = bool(sam_prior)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        sparse, dense = self.prompt_embeddings(point_coords, point_labels, mask_input, has_mask_input)
        tokens, image_tokens = self.mask_decoder.run_transformer(image_embeddings, self.dense_pe, sparse, dense)
        features = self.mask_decoder.upscale(image_tokens)
        if not self.sam_prior:
            return features
        hyper = self.mask_decoder.output_hypernetworks_mlps[0](tokens[:, 1, :])  # (1, C/8)
        return features, torch.einsum("bc,bchw->bhw", hyper, features)[:, None]


class _ImplicitPoints(nn.Module):
    """What both implicit graphs share: the query inputs ``z = [U(p) || PE(p) || gamma(p)]`` and the coarse MLP,
    as :class:`~imedsam.decoders.implicit.ImplicitDecoder` computes them in eval mode."""

    def __init__(self, decoder: ImplicitDecoder, prompt_pe: torch.Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("prompt_pe", prompt_pe.detach().float().clone())

    def query_inputs(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``features (1, Cf, h, w)``, ``coords (1, Q, 2)`` -> ``z (Q, in_dim)``."""
        gamma = self.decoder.encoding(coords).to(features.dtype)
        z = torch.cat((sample_features(features, coords), sample_features(self.prompt_pe, coords), gamma), dim=-1)
        return z.reshape(-1, self.decoder.in_dim)


class ImplicitCoarseGraph(_ImplicitPoints):
    """Coarse logits at every query and, when ``mc_masks`` (1, T, D) are given (paper mode), the MC-dropout
    uncertainty (population variance of the T passes' probabilities, :func:`imedsam.decoders.ugs.mc_variance`)."""

    def __init__(self, decoder: ImplicitDecoder, prompt_pe: torch.Tensor, mc_masks: torch.Tensor | None) -> None:
        super().__init__(decoder, prompt_pe)
        self.with_uncertainty = mc_masks is not None
        if mc_masks is not None:
            heads = decoder.coarse_heads
            w_logit = torch.stack([h.weight[0] for h in heads]).float()  # (K, D)
            b_logit = torch.stack([h.bias[0] for h in heads]).float()  # (K,)
            w_mc = mc_masks[0][:, None, :] * w_logit[None]  # (T, K, D), the dropout mask folded into the weight
            self.classes, self.passes = w_logit.shape[0], mc_masks.shape[1]
            self.register_buffer("mc_weight", w_mc.permute(1, 0, 2).reshape(-1, w_mc.shape[-1]).clone())
            self.register_buffer("mc_bias", b_logit.repeat_interleave(self.passes).clone())

    def forward(self, features: torch.Tensor, coords: torch.Tensor):
        z = self.query_inputs(features, coords)
        h = self.decoder.coarse_trunk(z)
        coarse = torch.stack([head(h)[:, 0] for head in self.decoder.coarse_heads])[None].float()  # (1, K, Q)
        if not self.with_uncertainty:
            return coarse
        mc = (h.float() @ self.mc_weight.T + self.mc_bias).reshape(-1, self.classes, self.passes)  # (Q, K, T)
        return coarse, mc_variance(mc).T[None]


class ImplicitFineGraph(_ImplicitPoints):
    """The fine INR's logits at the given queries (the runtime passes the selected ones)."""

    def forward(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        z = self.query_inputs(features, coords)
        h = d.coarse_trunk(z)
        logits = []
        for head, fine_head in zip(d.coarse_heads, d.fine_heads):
            fin = torch.cat((z, head(h)[:, 1:].to(z.dtype)), dim=-1)
            logits.append(fine_head(d.fine_trunk(fin))[:, 0].float())
        return torch.stack(logits)[None]  # (1, K, Q)
