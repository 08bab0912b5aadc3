"""MI2P (Liang et al., CVPR 2022): inject a foreign modality into every layer of a host stream.

Two models share the pretrained layers: text as host with the image injected, and the image as
host with the text injected. After each host layer an injection plug-in lets the host tokens
(queries) attend to the foreign features (keys and values) and adds the result to the host
states. The plug-in's output projection starts at zero, so at initialisation the host runs its
pretrained unimodal path exactly; fine-tuning opens the injection gradually.

The foreign features are the other modality's own unimodal encoding (the whole encoder, alone).
The paper keeps the foreign extractor pretrained and frozen, so by default
(``fusion.mi2p_foreign: frozen_copy``) it is a frozen copy of the release's encoder taken before
fine-tuning (embeddings and layers; ``requires_grad`` off, so no optimizer holds it): whatever
the hosts learn, the foreign features of an input stay the pretrained ones. It is part of the
model's state, so exports and checkpoints carry it. ``shared`` runs the hosts' own encoder
without gradient instead: no second copy in memory, but its features drift as the shared layers
are fine-tuned through the host path, so that extractor is not frozen. The paper
derives keys for CNN channels from a per-channel convolution with global pooling because a
feature map's channels are not tokens; our regions already are tokens in the hidden space, so
keys and values are plain linear projections for both directions.

The two hosts' pooled outputs are combined by attention-weighted fusion (the paper's best
variant): a learned score per summary, softmax over the two, weighted sum.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from finetune.fusion.config import FusionConfig
from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.model import ImageBertModel


class ZeroInitLinear(nn.Linear):
    """A linear layer that starts at zero (``finetune.tasks.FinetuneModel._init_weights``)."""


class InjectionPlugin(nn.Module):
    """host + out(attention(query=host, key/value=foreign)); ``out`` starts at zero."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"fusion.mi2p_heads={heads} does not divide hidden_size={hidden}; pick a divisor")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = ZeroInitLinear(hidden, hidden)

    def forward(self, host: torch.Tensor, foreign: Stream) -> torch.Tensor:
        batch, host_length, hidden = host.shape
        head_dim = hidden // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        query, key, value = split(self.query(host)), split(self.key(foreign.states)), split(self.value(foreign.states))
        # Every foreign stream starts with a real [CLS], so no query row is fully masked.
        injected = F.scaled_dot_product_attention(query, key, value, attn_mask=foreign.mask[:, None, None, :])
        return host + self.out(injected.transpose(1, 2).reshape(batch, host_length, hidden))


class AttentionWeightedCombination(nn.Module):
    """sum_k softmax_k(w . tanh(W p_k)) p_k over the hosts' pooled summaries."""

    def __init__(self, hidden: int):
        super().__init__()
        self.project = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)  # a bias shifts both scores alike: softmax ignores it

    def forward(self, summaries: torch.Tensor) -> torch.Tensor:  # [B, K, H] -> [B, H]
        weights = self.score(torch.tanh(self.project(summaries))).softmax(dim=1)
        return (weights * summaries).sum(1)


class InjectionFusion(FusionEncoder):
    """``pooled = [attention-weighted combination of text-host and image-host summaries]``."""

    def __init__(self, encoder: ImageBertModel, cfg: FusionConfig):
        hidden = encoder.config.hidden_size
        super().__init__(encoder, pooled_dims=[hidden])
        layers = encoder.config.num_hidden_layers
        self.image_into_text = nn.ModuleList(InjectionPlugin(hidden, cfg.mi2p_heads) for _ in range(layers))
        self.text_into_image = nn.ModuleList(InjectionPlugin(hidden, cfg.mi2p_heads) for _ in range(layers))
        self.combine = AttentionWeightedCombination(hidden)
        # The pretrained weights as they are now, before any fine-tuning step. The pooler is
        # dropped: foreign features are token states, never a summary.
        self.foreign_encoder = None
        if cfg.mi2p_foreign == "frozen_copy":
            self.foreign_encoder = copy.deepcopy(encoder).requires_grad_(False)
            self.foreign_encoder.bert.pooler = None

    def frozen_modules(self) -> list[nn.Module]:
        return [self.foreign_encoder] if self.foreign_encoder is not None else []

    def foreign_features(self, text: Stream, image: Stream, inputs: FusionInputs) -> tuple[Stream, Stream]:
        """Each modality's unimodal encoding by the foreign extractor, without gradient."""
        with torch.no_grad():
            if self.foreign_encoder is not None:
                text, image = self.embed(inputs, self.foreign_encoder)
                layers = self.foreign_encoder.bert.encoder.layer
            else:
                layers = self.layers
            for layer in layers:
                text, image = run_layer(layer, text), run_layer(layer, image)
        return text, image

    def train(self, mode: bool = True) -> "InjectionFusion":
        super().train(mode)
        if self.foreign_encoder is not None:
            self.foreign_encoder.eval()  # frozen means no dropout either: the pretrained features as they are
        return self

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        foreign_text, foreign_image = self.foreign_features(text, image, inputs)
        for index, layer in enumerate(self.layers):
            text_host, image_host = run_layer(layer, text), run_layer(layer, image)
            text = Stream(self.image_into_text[index](text_host.states, foreign_image), text.mask)
            image = Stream(self.text_into_image[index](image_host.states, foreign_text), image.mask)
        summaries = torch.stack([self.pool(text), self.pool(image)], dim=1)
        return FusedOutput(text_states=text.states, region_states=image.states[:, 1:], pooled=[self.combine(summaries)])
