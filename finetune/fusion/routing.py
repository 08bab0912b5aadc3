"""The one mechanism every fusion strategy is built from: pretrained BERT layers run over token sets.

A strategy is a choice of which tokens share an attention call in which layer. Streams that must
not see each other are simply run as separate calls of the same layer (same weights, no mask
tricks needed); tokens that may see each other are concatenated and share one call under a key
mask. Everything here reuses the release's own modules: word/segment/position embeddings, region
embeddings, each ``BertLayer`` and the ``BertPooler``. Strategies add only the parameters their
paper adds (bottleneck tokens, plug-ins, decoders, MBT's per-modality copies of the layers,
MI2P's frozen foreign extractor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import apply_chunking_to_forward

from pretrain.model import ImageBertModel, check_feature_dim


@dataclass
class Stream:
    """Tokens that attend to each other: states [B, N, H] and which of them are real (bool [B, N])."""

    states: torch.Tensor
    mask: torch.Tensor


@dataclass
class FusedOutput:
    text_states: torch.Tensor  # [B, T, H] final text token states (MNER tags them)
    region_states: torch.Tensor  # [B, R, H] final region states (no image [CLS])
    # One or more [B, D_i] summaries: a head applies one linear per entry (or one shared linear to
    # every entry: FusionEncoder.shared_head) and averages the logits.
    pooled: list[torch.Tensor]
    aux_loss: torch.Tensor | None = None  # already weighted (MuSE's alpha/beta); None when the strategy has none


def sdpa_mask(key_mask: torch.Tensor, query_length: int) -> torch.Tensor | None:
    """4-D boolean mask for SDPA (True = may attend), or None when every key is real.

    None mirrors what ``BertModel`` passes for an unpadded batch, so SDPA takes the same kernel
    and a strategy that routes like ImageBERT reproduces its numbers bit for bit.
    """
    if bool(key_mask.all()):
        return None
    return key_mask[:, None, None, :].expand(-1, 1, query_length, -1)


def run_layer(layer: nn.Module, stream: Stream) -> Stream:
    """One whole pretrained BertLayer over the stream's tokens."""
    states = layer(stream.states, attention_mask=sdpa_mask(stream.mask, stream.states.shape[1]))
    return Stream(states, stream.mask)


def run_attention_block(layer: nn.Module, stream: Stream) -> torch.Tensor:
    """The layer's self-attention sub-block (attention, output projection, residual, LayerNorm)."""
    states, _ = layer.attention(stream.states, sdpa_mask(stream.mask, stream.states.shape[1]))
    return states


def run_feed_forward_block(layer: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The layer's feed-forward sub-block (intermediate, output, residual, LayerNorm)."""
    return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, states)


def cls_attention(layer: nn.Module, stream: Stream) -> torch.Tensor:
    """How much [CLS] (token 0) attends to each token in this layer, averaged over heads: [B, N].

    SDPA does not return attention weights, so this recomputes only what the [CLS] row needs
    from the layer's own projections: the query of one token and the keys of all tokens (one
    H x H projection per token, about a twelfth of a BERT layer's FLOPs).
    """
    attention = layer.attention.self
    batch, length, _ = stream.states.shape
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(stream.states[:, :1]).view(batch, heads, head_dim)
    key = attention.key(stream.states).view(batch, length, heads, head_dim)
    scores = torch.einsum("bhd,bnhd->bhn", query, key) * attention.scaling
    scores = scores.masked_fill(~stream.mask[:, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


@dataclass
class FusionInputs:
    """What a strategy reads from a batch: the model inputs, and MuSE's captioning targets."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    region_features: torch.Tensor  # [B, R, D]
    region_geometry: torch.Tensor  # [B, R, 5]
    region_mask: torch.Tensor  # [B, R]
    region_blanked: torch.Tensor | None = None  # [B, R] regions whose feature is hidden (text-only baseline)
    caption_labels: torch.Tensor | None = None  # [B, T] MuSE's captioning targets (None: the paired caption)


class FusionEncoder(nn.Module):
    """Base of every strategy: embeds both modalities once, then ``route``s the streams.

    ``forward`` embeds the text stream (``[CLS] text [SEP]``) and the image stream (an image
    [CLS], then the regions) with the release's own embeddings and hands both to ``route``,
    which each strategy implements: which tokens share an attention call in which layer, and
    what crosses between the modalities. Subclasses also set ``pooled_dims`` (and ``shared_head``).
    """

    def __init__(self, encoder: ImageBertModel, pooled_dims: list[int], shared_head: bool = False):
        super().__init__()
        self.encoder = encoder
        self.hidden_size = encoder.config.hidden_size
        self.pooled_dims = pooled_dims
        # True: a head applies ONE layer to every pooled summary (they share a space: MBT's classifier).
        self.shared_head = shared_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.bert.encoder.layer

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that must never train (``requires_grad`` off; the fine-tuning model keeps them so)."""
        return []

    def forward(self, inputs: FusionInputs) -> FusedOutput:
        check_feature_dim(inputs.region_features, self.encoder.config)
        return self.route(*self.embed(inputs), inputs)

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        raise NotImplementedError

    def embed(self, inputs: FusionInputs, encoder: ImageBertModel | None = None) -> tuple[Stream, Stream]:
        """The text and the image stream, embedded by ``encoder``'s embeddings (default: the release's)."""
        encoder = encoder if encoder is not None else self.encoder
        text = Stream(encoder.embed_tokens(inputs.input_ids, segment=0), inputs.attention_mask.bool())
        return text, self.embed_image(inputs, encoder)

    def embed_image(self, inputs: FusionInputs, encoder: ImageBertModel) -> Stream:
        """The image stream: an image [CLS] followed by the regions.

        Two-stream strategies need a summary token per modality. The image [CLS] is the text's
        [CLS] word embedding (the tokenizer's first token) with the image segment and position 0,
        so it starts from pretrained weights and differs from every region (those share the
        region position). Single stream drops it: its regions follow the text.
        """
        cls = encoder.embed_tokens(inputs.input_ids[:, :1], segment=1)
        regions = encoder.embed_regions(inputs.region_features, inputs.region_geometry, inputs.region_blanked)
        cls_mask = torch.ones_like(inputs.region_mask[:, :1], dtype=torch.bool)
        return Stream(torch.cat([cls, regions.to(cls.dtype)], 1), torch.cat([cls_mask, inputs.region_mask.bool()], 1))

    def pool(self, stream: Stream) -> torch.Tensor:
        """The release's summary of a stream: the pretrained pooler on its token 0 or its mean
        (``ImageBertModel.pool``, as the release was pretrained)."""
        return self.encoder.pool(stream.states, stream.mask)
