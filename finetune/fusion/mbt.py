"""MBT (Nagrani et al., NeurIPS 2021): attention bottlenecks between the text and image streams.

Below layer ``L_f`` each modality runs alone. From ``L_f`` on, each modality's call of the layer
attends over its own tokens plus ``B`` shared bottleneck tokens; the two updated copies of the
bottlenecks are averaged and carried to the next layer. Cross-modal information can therefore
only pass through the bottlenecks, and only from layer ``L_f + 1`` on: in layer ``L_f`` the
bottlenecks are still the learned initial tokens, which no input has touched.

Parameters (``fusion.mbt_parameters``): the paper gives each modality its own transformer and
finds that better than sharing one. ``per_modality`` (default) does that: the text stream runs
the release's layers, the image stream its own copy of them from the first layer on, both
initialised from the same pretrained weights and fine-tuned apart. ``shared`` runs both streams
through the release's layers (half the encoder parameters). Embeddings and the pooler stay
shared: they are modality-specific already (word vs. region embeddings) or a summary both
[CLS] tokens go through before the one classifier.

Classifier (``fusion.mbt_classifier``): the paper applies ONE linear layer to both [CLS] tokens
and averages the logits. ``shared`` (default) does that (``shared_head``: the head applies one
layer to both pooled summaries); ``per_modality`` gives each summary its own layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from finetune.fusion.config import FusionConfig
from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.model import ImageBertModel


class BottleneckFusion(FusionEncoder):
    """Per-modality [CLS] logits averaged: ``pooled = [text_pool, image_pool]``."""

    def __init__(self, encoder: ImageBertModel, cfg: FusionConfig):
        hidden = encoder.config.hidden_size
        super().__init__(encoder, pooled_dims=[hidden, hidden], shared_head=cfg.mbt_classifier == "shared")
        self.fusion_layer = cfg.mbt_fusion_layer
        # New tokens, initialised small like BERT's own embeddings (MBT: normal, std 0.02; see
        # finetune.tasks.FinetuneModel._init_weights). None for B = 0: an empty parameter would be
        # one more thing for ZeRO to partition for nothing.
        self.bottlenecks = nn.Parameter(torch.empty(1, cfg.mbt_bottlenecks, hidden)) if cfg.mbt_bottlenecks else None
        # Copied now, before any fine-tuning step, so both modalities start from the pretrained weights.
        self.image_layers = copy.deepcopy(self.layers) if cfg.mbt_parameters == "per_modality" else None

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        batch, text_length, image_length = text.states.shape[0], text.states.shape[1], image.states.shape[1]
        if self.bottlenecks is not None:
            bottlenecks = self.bottlenecks.to(text.states.dtype).expand(batch, -1, -1)
            bottleneck_mask = torch.ones(bottlenecks.shape[:2], dtype=torch.bool, device=bottlenecks.device)
        image_layers = self.image_layers if self.image_layers is not None else self.layers
        for index, (text_layer, image_layer) in enumerate(zip(self.layers, image_layers)):
            if index < self.fusion_layer or self.bottlenecks is None:
                text, image = run_layer(text_layer, text), run_layer(image_layer, image)
                continue
            text_out = run_layer(text_layer, _join(text, bottlenecks, bottleneck_mask))
            image_out = run_layer(image_layer, _join(image, bottlenecks, bottleneck_mask))
            text = Stream(text_out.states[:, :text_length], text.mask)
            image = Stream(image_out.states[:, :image_length], image.mask)
            bottlenecks = (text_out.states[:, text_length:] + image_out.states[:, image_length:]) / 2
        return FusedOutput(
            text_states=text.states,
            region_states=image.states[:, 1:],
            pooled=[self.pool(text), self.pool(image)],
        )


def _join(stream: Stream, bottlenecks: torch.Tensor, bottleneck_mask: torch.Tensor) -> Stream:
    return Stream(torch.cat([stream.states, bottlenecks], 1), torch.cat([stream.mask, bottleneck_mask], 1))
