"""MuSE (Zhu et al., 2023): token exchange between two streams that share every parameter.

Both modalities run through the same pretrained layers as separate streams (MuSE's
CrossTransformer with shared parameters). In exchange layers ``mu..eta`` (0-based, inclusive)
the layer is split at its two sub-blocks: after self-attention, in each modality the tokens
that [CLS] attends to least are replaced by the other modality's mean token plus a residual
(the token itself), and only then does the feed-forward block run. This is where MuSE's
reference code exchanges (after the post-LN attention block, before the FFN).

Which tokens: the reference's ``--use_quantile`` rule, which all its run scripts use. Per
sample, the tokens whose [CLS] attention lies strictly below the ``theta``-quantile (linear
interpolation, as ``numpy.quantile``) of the attention over its real non-[CLS] tokens; with
distinct weights that is ``ceil(theta * (n - 1))`` of ``n`` tokens. [CLS] never takes part and,
unlike the reference (which pads text to a fixed length and ranks the padding too), padding
neither counts nor is exchanged. The [CLS] attention row comes from ``routing.cls_attention``;
the selection is discrete, so it is computed without gradient.

MuSE's two auxiliary losses (``muse_decoders``) regularise the embeddings the streams start
from: captioning from the image stream's embeddings (weight alpha) and region-feature generation
from the text stream's embeddings (weight beta). They are computed in training mode only.

Defaults are the reference's run scripts: theta 0.1, exchange layers 1..3 of 6, alpha = beta =
1e-3 (its twitter2015 script and argument defaults; its twitter2017 script uses 1e-4). The
NER head's CRF learning rate and dropout are task keys (``task.crf_lr``, ``task.crf_dropout``).

Where this differs from the paper and its code (substitutions):

- encoders: the paper encodes text with BERT and the image with a ResNet, projects both into a
  small common space and exchanges in a separate CrossTransformer. Here both streams are the
  release's own ImageBERT layers over word-piece and region (ROI feature) embeddings, in the
  encoder's hidden space, which ImageBERT pretraining already shares between the modalities;
- image generation: the paper generates pixels (PixelCNN++); our image is a set of region
  features, so the generator predicts each region's feature from the text, queried by its box;
- captioning: the paper's NIC-style LSTM captioner becomes one causal transformer decoder layer
  over the release's word embeddings (``muse_decoders.CaptionDecoder``).
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
        self.exchange_quantile = cfg.muse_exchange_quantile
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
                text_selected = lowest_attended(cls_attention(layer, text), text.mask, self.exchange_quantile)
                image_selected = lowest_attended(cls_attention(layer, image), image.mask, self.exchange_quantile)
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


def lowest_attended(cls_row: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Bool [B, N]: the real non-[CLS] tokens whose [CLS] attention is strictly below the
    ``quantile``-quantile of that sample's real non-[CLS] tokens' attention (MuSE's quantile rule)."""
    candidates = mask.clone()
    candidates[:, 0] = False
    # NaN marks what is not a candidate: nanquantile skips it and no comparison with it is true,
    # so a sample without candidates exchanges nothing.
    scores = cls_row.float().masked_fill(~candidates, float("nan"))
    threshold = torch.nanquantile(scores, quantile, dim=-1, keepdim=True)
    return candidates & (scores < threshold)
