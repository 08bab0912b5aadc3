"""CMG's cross-modal generalisation protocol: a head trained on one modality, applied to the other.

Xia et al. (NeurIPS 2023) pretrain a codebook shared by two modalities, then freeze everything
and train a downstream head on ONE modality's quantised semantic features; the head is tested
on the OTHER modality's. Here each modality runs through the release's encoder alone (the caption
without the image, the regions without the caption: the unimodal passes CMG pretrains on,
``ImageBertForPretraining.cmg_losses``), then through CMG's semantic encoder of that modality and
the shared codebook, and the head reads the mean over the sequence. Everything the release
brings is frozen (no gradient, eval mode); only the head (and, for retrieval, a projection) learns.

``fusion.cross_modal_representation`` says what is pooled: ``codes`` (the quantised semantic
vectors: the paper's), ``semantic`` (before quantisation) or ``hidden`` (the encoder's states:
what a release pretrained without CMG's objectives offers, the protocol's control).

Classification: training batches are read through ``fusion.cross_modal_train``'s modality only,
evaluation (``model.eval()``) through ``fusion.cross_modal_eval``'s (default: the other one).
Retrieval ("text query against region codes"): a pair's score is the cosine between the pooled
caption and the pooled regions after one linear projection shared by both modalities, which
starts as the identity (so step 0 ranks by the codes' own similarity), and a 1-to-1 head that
learns the scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.fusion.config import CROSS_MODAL_MODALITIES as MODALITIES
from finetune.fusion.config import FusionConfig
from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer
from pretrain.cmg import CMGObjectives
from pretrain.model import ImageBertModel, masked_mean

COSINE_SCALE = 10.0  # a temperature of 0.1, CLIP-like, so a softmax over cosines is not flat at step 0


class CrossModalTransfer(FusionEncoder):
    """One modality at a time through the frozen release (encoder, CMG's semantic encoder and codebook)."""

    def __init__(self, encoder: ImageBertModel, cfg: FusionConfig, cmg: CMGObjectives | None, retrieval: bool):
        representation = cfg.cross_modal_representation
        if representation != "hidden" and cmg is None:
            raise ValueError(
                f"fusion.cross_modal_representation is {representation!r} but the release was pretrained without "
                "CMG's objectives (its config.json has no 'cmg'); use 'hidden' or a release pretrained with cmg.enabled"
            )
        width = encoder.config.hidden_size if representation == "hidden" else cmg.codebook.embedding.shape[1]
        super().__init__(encoder, pooled_dims=[1 if retrieval else width])
        self.train_modality = cfg.cross_modal_train
        self.eval_modality = cfg.cross_modal_eval or next(m for m in MODALITIES if m != cfg.cross_modal_train)
        # The release's modules the protocol reads (frozen); CLUB's and Cross-CPC's are pretraining's only.
        self.semantic = None if representation == "hidden" else nn.ModuleDict({"text": cmg.text, "image": cmg.regions})
        self.codebook = None if representation != "codes" else cmg.codebook
        self.projection = nn.Linear(width, width, bias=False) if retrieval else None  # None: classification

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.semantic, self.codebook) if m is not None]

    def train(self, mode: bool = True) -> "CrossModalTransfer":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen means no dropout either: the release's features as they are
        return self

    def start_from_cosine(self, head: nn.Module) -> None:
        """Retrieval starts from the release's own similarity: the projection is the identity and
        the head (``PooledHead`` over the one-wide cosine) multiplies by ``COSINE_SCALE``, so step
        0 ranks by the representations' cosine. Training moves both."""
        linear = head.heads[0]
        if self.projection is None or not isinstance(linear, nn.Linear):
            raise ValueError("fusion.name cross_modal with task retrieval needs task.head_hidden: 0 (a linear scorer)")
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(self.projection.in_features))
            linear.weight.fill_(COSINE_SCALE)
            linear.bias.zero_()

    def represent(self, stream: Stream, modality: str) -> torch.Tensor:
        """``[B, D]``: one modality's pooled representation through the frozen release."""
        with torch.no_grad():
            for layer in self.layers:
                stream = run_layer(layer, stream)
            states = stream.states
            if self.semantic is not None:
                states, _ = self.semantic[modality](states)
                if self.codebook is not None:
                    states = self.codebook.codes(states)
            return masked_mean(states, stream.mask)

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        regions = Stream(image.states[:, 1:], image.mask[:, 1:])  # the regions alone, as CMG pretrained on them
        streams = {"text": text, "image": regions}
        if self.projection is not None:
            caption, picture = (self.projection(self.represent(streams[m], m)) for m in MODALITIES)
            pooled = F.cosine_similarity(caption, picture, dim=-1).unsqueeze(-1)
        else:
            modality = self.train_modality if self.training else self.eval_modality
            pooled = self.represent(streams[modality], modality)
        return FusedOutput(text_states=text.states, region_states=regions.states, pooled=[pooled])
