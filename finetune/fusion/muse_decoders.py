"""MuSE's two auxiliary decoders, which pull both modalities' embeddings into one space.

MuSE adds Gaussian noise to each modality's embeddings, maps them with an MLP, and asks a
decoder to produce the other modality: a caption from the image (NIC-style captioning) and the
image from the text (PixelCNN++ in the paper). Here the image is a set of region features, so
"generation" means predicting each region's ROI feature from the text, queried by the region's
box (the layout says where, the text says what). Both decoders are one attention block wide:
they regularise the embeddings, they are not meant to be good generators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.fusion.routing import Stream
from pretrain.model import GEOMETRY_DIM, IGNORE_INDEX, ImageBertConfig, ImageBertModel


class NoisyProjection(nn.Module):
    """MLP(x + N(0, std^2)); the noise only during training."""

    def __init__(self, hidden: int, noise_std: float):
        super().__init__()
        self.noise_std = noise_std
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std:
            states = states + torch.randn_like(states) * self.noise_std
        return self.mlp(states)


class CaptionDecoder(nn.Module):
    """Captioning from the image stream's embeddings: one causal decoder layer, teacher forcing.

    Token inputs reuse the release's word/position embeddings, and the vocabulary projection is
    tied to the word embeddings, so the only new parameters are the decoder layer and the MLP.
    """

    def __init__(self, config: ImageBertConfig, noise_std: float, word_embeddings: nn.Embedding):
        super().__init__()
        self.project = NoisyProjection(config.hidden_size, noise_std)
        self.layer = nn.TransformerDecoderLayer(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.hidden_dropout_prob,
            activation="gelu",
            batch_first=True,
        )
        # The word embedding matrix, shared like the MLM decoder's (declared to the library in
        # finetune.tasks.FinetuneModel). Registered here, not read from the encoder in forward, so
        # that ZeRO-3 gathers it when this module runs.
        self.vocab_weight = word_embeddings.weight

    def forward(self, image: Stream, caption_labels: torch.Tensor, encoder: ImageBertModel) -> torch.Tensor:
        """Mean cross-entropy of predicting caption token t+1 from tokens <= t and the image."""
        inputs = caption_labels[:, :-1].clamp(min=0)  # ignored positions feed some real token id; never a target
        targets = caption_labels[:, 1:]
        embedded = encoder.embed_tokens(inputs, segment=0)
        causal = torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool, device=inputs.device).triu(1)
        memory = self.project(image.states)
        # Padding sits after the caption, so the causal mask alone keeps it out of every target's context.
        decoded = self.layer(embedded, memory, tgt_mask=causal, memory_key_padding_mask=~image.mask)
        selected = targets != IGNORE_INDEX
        logits = F.linear(decoded[selected], self.vocab_weight)
        return _mean_or_zero(F.cross_entropy(logits.float(), targets[selected], reduction="sum"), logits)


class RegionFeatureGenerator(nn.Module):
    """Region-feature generation from the text stream's embeddings, one query per region box."""

    def __init__(self, config: ImageBertConfig, noise_std: float):
        super().__init__()
        hidden = config.hidden_size
        self.project = NoisyProjection(hidden, noise_std)
        self.box_query = nn.Sequential(nn.Linear(GEOMETRY_DIM, hidden), nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.attention = nn.MultiheadAttention(hidden, config.num_attention_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.out = nn.Sequential(nn.Linear(hidden, config.intermediate_size), nn.GELU())
        self.feature = nn.Linear(config.intermediate_size, config.feature_dim)

    def forward(
        self, text: Stream, region_geometry: torch.Tensor, region_features: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error per real region (averaged over feature dims)."""
        memory = self.project(text.states)
        query = self.box_query(region_geometry.to(memory.dtype))
        # [CLS] is always real, so no query ever faces an all-masked memory.
        attended, _ = self.attention(query, memory, memory, key_padding_mask=~text.mask, need_weights=False)
        predicted = self.feature(self.out(self.norm(query + attended)))
        per_region = F.mse_loss(predicted.float(), region_features.float(), reduction="none").mean(-1)
        return _mean_or_zero(per_region[region_mask].sum(), per_region, count=int(region_mask.sum()))


def _mean_or_zero(loss_sum: torch.Tensor, like: torch.Tensor, count: int | None = None) -> torch.Tensor:
    # A batch can hold no caption token / no region; keep the graph connected so every rank runs the same backward.
    count = like.shape[0] if count is None else count
    return loss_sum / count if count else like.sum() * 0.0
