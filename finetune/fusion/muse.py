"""MuSE (Zhu et al., 2023): token exchange between two streams that share every parameter.

Both modalities run through the same pretrained layers as separate streams (MuSE's
CrossTransformer with shared parameters). In exchange layers ``mu..eta`` (0-based, inclusive)
the layer is split at its two sub-blocks: after self-attention, in each modality the fraction
``theta`` of tokens that [CLS] attends to least is replaced by the other modality's mean token
plus a residual (the token itself), and only then does the feed-forward block run. This is where
MuSE's reference code exchanges (after the post-LN attention block, before the FFN).

[CLS] never takes part in the exchange and padding never counts: a modality with ``n`` real
non-[CLS] tokens exchanges exactly ``round(theta * n)`` of them (round half to even, Python's
``round``). The [CLS] attention row comes from ``routing.cls_attention``; the selection is
discrete, so it is computed without gradient.

MuSE's two auxiliary losses (``muse_decoders``) regularise the embeddings the streams start
from: captioning from the image stream's embeddings (weight alpha) and region-feature generation
from the text stream's embeddings (weight beta). They are computed in training mode only.
"""

from __future__ import annotations

import torch

from finetune.fusion.config import FusionConfig
from finetune.fusion.muse_decoders import CaptionDecoder, RegionFeatureGenerator
from finetune.fusion.routing import (
    FusedOutput,
    FusionEncoder,
    FusionInputs,
    Stream,
    cls_attention,
    run_attention_block,
    run_feed_forward_block,
    run_layer,
)
from pretrain.model import IGNORE_INDEX, ImageBertModel, masked_mean


class ExchangeFusion(FusionEncoder):
    """Fused summary: ``pooled = [concat(text_pool, image_pool)]`` (MuSE concatenates both streams' outputs)."""

    def __init__(self, encoder: ImageBertModel, cfg: FusionConfig):
        hidden = encoder.config.hidden_size
        super().__init__(encoder, pooled_dims=[2 * hidden])
        self.exchange_start = cfg.muse_exchange_start
        self.exchange_end = cfg.muse_exchange_end
        self.exchange_fraction = cfg.muse_exchange_fraction
        self.caption_weight = cfg.muse_caption_weight
        self.generation_weight = cfg.muse_generation_weight
        self.caption_decoder = (
            CaptionDecoder(encoder.config, cfg.muse_aux_noise, encoder.bert.embeddings.word_embeddings)
            if cfg.muse_caption_weight
            else None
        )
        self.region_generator = (
            RegionFeatureGenerator(encoder.config, cfg.muse_aux_noise) if cfg.muse_generation_weight else None
        )

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        aux_loss = None
        if self.training:  # the decoders regularise training; inference does not pay for them
            aux_loss = self.auxiliary_loss(text, image, inputs)
        for index, layer in enumerate(self.layers):
            if not self.exchange_start <= index <= self.exchange_end:
                text, image = run_layer(layer, text), run_layer(layer, image)
                continue
            with torch.no_grad():
                text_selected = lowest_attended(cls_attention(layer, text), text.mask, self.exchange_fraction)
                image_selected = lowest_attended(cls_attention(layer, image), image.mask, self.exchange_fraction)
            text_mid = run_attention_block(layer, text)
            image_mid = run_attention_block(layer, image)
            # Both means come from the states before either exchange, so the swap is symmetric.
            text_mean, image_mean = masked_mean(text_mid, text.mask), masked_mean(image_mid, image.mask)
            text_mid = text_mid + text_selected[..., None] * image_mean[:, None]
            image_mid = image_mid + image_selected[..., None] * text_mean[:, None]
            text = Stream(run_feed_forward_block(layer, text_mid), text.mask)
            image = Stream(run_feed_forward_block(layer, image_mid), image.mask)
        pooled = torch.cat([self.pool(text), self.pool(image)], dim=-1)
        return FusedOutput(
            text_states=text.states, region_states=image.states[:, 1:], pooled=[pooled], aux_loss=aux_loss
        )

    def auxiliary_loss(self, text: Stream, image: Stream, inputs: FusionInputs) -> torch.Tensor | None:
        losses = []
        if self.caption_decoder is not None:
            caption_labels = inputs.caption_labels
            if caption_labels is None:
                # The paired text is the caption to reconstruct; padding is not.
                caption_labels = inputs.input_ids.masked_fill(~text.mask, IGNORE_INDEX)
            caption = self.caption_decoder(image, caption_labels, self.encoder)
            losses.append(self.caption_weight * caption)
        if self.region_generator is not None:
            regions = image.mask[:, 1:]
            generation = self.region_generator(text, inputs.region_geometry, inputs.region_features, regions)
            losses.append(self.generation_weight * generation)
        return sum(losses) if losses else None


def exchange_counts(mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """How many tokens each sample exchanges: round(fraction * real non-[CLS] tokens), per sample [B]."""
    candidates = mask[:, 1:].sum(-1).double()
    return torch.round(candidates * fraction).long()


def lowest_attended(cls_row: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool [B, N]: the ``exchange_counts`` real non-[CLS] tokens with the least [CLS] attention."""
    candidates = mask.clone()
    candidates[:, 0] = False
    scores = cls_row.float().masked_fill(~candidates, float("inf"))
    rank = scores.argsort(dim=-1, stable=True).argsort(dim=-1)
    return rank < exchange_counts(mask, fraction)[:, None]
