"""MBT (Nagrani et al., NeurIPS 2021): attention bottlenecks between the text and image streams.

Below layer ``L_f`` each modality runs alone. From ``L_f`` on, each modality's call of the layer
attends over its own tokens plus ``B`` shared bottleneck tokens; the two updated copies of the
bottlenecks are averaged and carried to the next layer. Cross-modal information can therefore
only pass through the bottlenecks, and only from layer ``L_f + 1`` on: in layer ``L_f`` the
bottlenecks are still the learned initial tokens, which no input has touched.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.fusion.config import FusionConfig
from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.model import ImageBertModel


class BottleneckFusion(FusionEncoder):
    """Per-modality [CLS] logits averaged: ``pooled = [text_pool, image_pool]``."""

    def __init__(self, encoder: ImageBertModel, cfg: FusionConfig):
        hidden = encoder.config.hidden_size
        super().__init__(encoder, pooled_dims=[hidden, hidden])
        self.fusion_layer = cfg.mbt_fusion_layer
        # New tokens, initialised small like BERT's own embeddings (MBT: normal, std 0.02; see
        # finetune.tasks.FinetuneModel._init_weights). None for B = 0: an empty parameter would be
        # one more thing for ZeRO to partition for nothing.
        self.bottlenecks = nn.Parameter(torch.empty(1, cfg.mbt_bottlenecks, hidden)) if cfg.mbt_bottlenecks else None

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        batch, text_length, image_length = text.states.shape[0], text.states.shape[1], image.states.shape[1]
        if self.bottlenecks is not None:
            bottlenecks = self.bottlenecks.to(text.states.dtype).expand(batch, -1, -1)
            bottleneck_mask = torch.ones(bottlenecks.shape[:2], dtype=torch.bool, device=bottlenecks.device)
        for index, layer in enumerate(self.layers):
            if index < self.fusion_layer or self.bottlenecks is None:
                text, image = run_layer(layer, text), run_layer(layer, image)
                continue
            text_out = run_layer(layer, _join(text, bottlenecks, bottleneck_mask))
            image_out = run_layer(layer, _join(image, bottlenecks, bottleneck_mask))
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
