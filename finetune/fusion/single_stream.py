"""ImageBERT's own joint encoding, the baseline: ``[CLS] text [SEP] regions`` in one stream."""

from __future__ import annotations

import torch

from finetune.fusion.routing import FusedOutput, FusionEncoder, Stream, run_layer
from pretrain.model import ImageBertModel


class SingleStreamFusion(FusionEncoder):
    """Every layer attends over text and regions together (full cross-modal attention)."""

    def __init__(self, encoder: ImageBertModel):
        super().__init__(encoder, pooled_dims=[encoder.config.hidden_size])

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
        regions = self.embed_regions(region_features, region_geometry, region_mask, text.states.dtype)
        joint = Stream(torch.cat([text.states, regions.states], 1), torch.cat([text.mask, regions.mask], 1))
        text_length = input_ids.shape[1]
        for index, layer in enumerate(self.layers):
            joint = run_layer(layer, joint)
            self.record(index, text=joint.states[:, :text_length], image=joint.states[:, text_length:])
        return FusedOutput(
            text_states=joint.states[:, :text_length],
            region_states=joint.states[:, text_length:],
            pooled=[self.pool(joint)],
        )
