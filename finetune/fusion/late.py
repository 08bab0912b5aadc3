"""Late fusion, the second baseline: each modality runs the whole encoder alone; pooled outputs concatenated."""

from __future__ import annotations

import torch

from finetune.fusion.routing import FusedOutput, FusionEncoder, run_layer
from pretrain.model import ImageBertModel


class LateFusion(FusionEncoder):
    """No attention crosses modalities; only the head sees both (``concat(text_pool, image_pool)``)."""

    def __init__(self, encoder: ImageBertModel):
        super().__init__(encoder, pooled_dims=[2 * encoder.config.hidden_size])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        region_features: torch.Tensor,
        region_geometry: torch.Tensor,
        region_mask: torch.Tensor,
        caption_labels: torch.Tensor | None = None,
    ) -> FusedOutput:
        self.check_features(region_features)
        text = self.embed_text(input_ids, attention_mask)
        image = self.embed_image(input_ids[:, :1], region_features, region_geometry, region_mask)
        for index, layer in enumerate(self.layers):
            text, image = run_layer(layer, text), run_layer(layer, image)
            self.record(index, text=text.states, image=image.states)
        pooled = torch.cat([self.pool(text), self.pool(image)], dim=-1)
        return FusedOutput(text_states=text.states, region_states=image.states[:, 1:], pooled=[pooled])
