"""Late fusion, the second baseline: each modality runs the whole encoder alone; pooled outputs concatenated."""

from __future__ import annotations

import torch

from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.model import ImageBertModel


class LateFusion(FusionEncoder):
    """No attention crosses modalities; only the head sees both (``concat(text_pool, image_pool)``)."""

    def __init__(self, encoder: ImageBertModel):
        super().__init__(encoder, pooled_dims=[2 * encoder.config.hidden_size])

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        for layer in self.layers:
            text, image = run_layer(layer, text), run_layer(layer, image)
        pooled = torch.cat([self.pool(text), self.pool(image)], dim=-1)
        return FusedOutput(text_states=text.states, region_states=image.states[:, 1:], pooled=[pooled])
