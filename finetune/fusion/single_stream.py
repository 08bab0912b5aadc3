"""ImageBERT's own joint encoding, the baseline: ``[CLS] text [SEP] regions`` in one stream."""

from __future__ import annotations

import torch

from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.model import ImageBertModel


class SingleStreamFusion(FusionEncoder):
    """Every layer attends over text and regions together (full cross-modal attention)."""

    def __init__(self, encoder: ImageBertModel):
        super().__init__(encoder, pooled_dims=[encoder.config.hidden_size])

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        regions = Stream(image.states[:, 1:], image.mask[:, 1:])  # no image [CLS]: the text's [CLS] summarises
        joint = Stream(torch.cat([text.states, regions.states], 1), torch.cat([text.mask, regions.mask], 1))
        for layer in self.layers:
            joint = run_layer(layer, joint)
        text_length = text.states.shape[1]
        return FusedOutput(
            text_states=joint.states[:, :text_length],
            region_states=joint.states[:, text_length:],
            pooled=[self.pool(joint)],
        )
