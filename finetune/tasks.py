"""The fine-tuning model: a fusion strategy over the release's encoder, and one task head.

``FinetuneModel`` is a ``transformers`` model of the same family as the release
(``ImageBertConfig``): ``save_pretrained`` writes a fine-tuned model, ``from_pretrained(DIR,
task, fusion)`` reads it back, and ``_init_weights`` initialises what fine-tuning adds.
``forward(batch)`` returns the training loss (task loss plus the strategy's weighted auxiliary
loss); ``predict(batch)`` returns what evaluation scores; ``score_pairs`` is the cross-encoder
retrieval score. ``build_finetune_model`` assembles it from a release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from finetune.config import TaskConfig
from finetune.fusion import FusionConfig
from finetune.fusion.build import build_fusion
from finetune.fusion.mbt import BottleneckFusion
from finetune.fusion.mi2p import ZeroInitLinear
from finetune.fusion.routing import FusionInputs
from finetune.heads import PooledHead, WordTagger, retrieval_loss
from pretrain.cmg import CMGObjectives
from pretrain.model import (
    IGNORE_INDEX, ImageBertConfig, ImageBertForPretraining, ImageBertModel, ImageBertPreTrainedModel,
)

_INPUTS = ("input_ids", "attention_mask", "region_features", "region_geometry", "region_mask", "region_blanked")


@dataclass
class TaskOutput:
    loss: torch.Tensor  # task loss + auxiliary loss: what backward runs on
    task_loss: torch.Tensor
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # classification [B, C]; ner emissions [B, W, K]; retrieval positive scores [B]


class FinetuneModel(ImageBertPreTrainedModel):
    """A fusion strategy over an ImageBERT encoder, and the task's head."""

    def __init__(
        self, config: ImageBertConfig, task: TaskConfig, fusion: FusionConfig, encoder: ImageBertModel | None = None,
        cmg: CMGObjectives | None = None,
    ):
        """``encoder`` and ``cmg`` (the release's CMG modules, which only ``cross_modal`` reads) are
        the release's; without them (``from_pretrained`` of a fine-tuned model) they are built anew."""
        super().__init__(config)
        self.task = task
        self.fusion = build_fusion(fusion, encoder if encoder is not None else ImageBertModel(config), task.name, cmg)
        if task.name == "ner":
            self.tagger = WordTagger(
                self.fusion.hidden_size, self.fusion.pooled_dims, task.num_labels, task.crf_dropout
            )
        else:
            outputs = 1 if task.name == "retrieval" else task.num_labels
            self.head = PooledHead(
                self.fusion.pooled_dims, outputs, task.head_hidden, task.dropout, shared=self.fusion.shared_head
            )
        if getattr(self.fusion, "caption_decoder", None) is not None:  # MuSE predicts words with the word embeddings
            self._tied_weights_keys = {
                "fusion.caption_decoder.vocab_weight": "fusion.encoder.bert.embeddings.word_embeddings.weight"
            }
        self.post_init()  # initialises what is new; the encoder's modules are initialised already
        self._freeze()

    def _freeze(self) -> None:
        for module in self.fusion.frozen_modules():  # MI2P's frozen foreign extractor
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameters with new ones that require gradients: freeze again.
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze()
        return loaded

    def lr_overrides(self) -> dict[str, float]:
        """Learning rates of parameter-name prefixes that differ from ``train.lr``: the NER tagger's
        (``task.crf_lr``), for ``pretrain.engine.param_groups``."""
        if self.task.name == "ner" and self.task.crf_lr is not None:
            return {"tagger.": self.task.crf_lr}
        return {}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BottleneckFusion) and module.bottlenecks is not None:
            # Like BERT's own embeddings (MBT: normal, std 0.02).
            init.normal_(module.bottlenecks, std=self.config.initializer_range)
        elif isinstance(module, ZeroInitLinear):
            # MI2P's plug-in outputs: at initialisation each host runs its pretrained unimodal path exactly.
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    def encode(self, batch: dict[str, Any], caption_labels: torch.Tensor | None = None):
        return self.fusion(FusionInputs(**{k: batch[k] for k in _INPUTS}, caption_labels=caption_labels))

    def forward(self, batch: dict[str, Any]) -> TaskOutput:
        kind = self.task.name
        if kind == "retrieval":
            return self._retrieval_forward(batch)
        fused = self.encode(batch)
        if kind == "ner":
            logits = self.tagger.emissions(fused.text_states, fused.pooled, batch["word_starts"])
            task_loss = self.tagger.loss(logits, batch["tags"], batch["word_mask"])
        else:
            logits = self.head(fused.pooled)
            if kind == "multilabel":
                task_loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
            else:
                task_loss = F.cross_entropy(logits, batch["labels"])
        return _output(task_loss, fused.aux_loss, logits)

    # ------------------------------------------------------------ retrieval

    def score_pairs(self, batch: dict[str, Any], caption_labels: torch.Tensor | None = None):
        """Cross-encoder score of each row's (caption, image) pair, ``[P]``, and the fused output."""
        fused = self.encode(batch, caption_labels)
        return self.head(fused.pooled).squeeze(-1), fused

    def _retrieval_forward(self, batch: dict[str, Any]) -> TaskOutput:
        """Each sample's matched pair against sampled mismatched captions and images from the batch."""
        n, k = len(batch["image_ids"]), self.task.retrieval_negatives
        image_of, caption_of = sample_negative_pairs(batch["image_ids"], k)
        pairs = pair_batch(batch, image_of, caption_of)
        # MuSE's captioning loss should describe an image with its own caption: negatives are ignored.
        caption_labels = pairs["input_ids"].masked_fill(~pairs["attention_mask"].bool(), IGNORE_INDEX)
        caption_labels[n:] = IGNORE_INDEX
        scores, fused = self.score_pairs(pairs, caption_labels)
        positive = scores[:n]
        negative_captions = scores[n : n + n * k].view(n, k)
        negative_images = scores[n + n * k :].view(n, k)
        task_loss = 0.5 * (
            retrieval_loss(positive, negative_captions, self.task.retrieval_loss, self.task.triplet_margin)
            + retrieval_loss(positive, negative_images, self.task.retrieval_loss, self.task.triplet_margin)
        )
        return _output(task_loss, fused.aux_loss, positive)

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Any:
        """Class ids [B]; 0/1 label matrix [B, C]; tag-id lists per sample (ner); matched-pair scores [B]."""
        kind = self.task.name
        if kind == "retrieval":
            return self.score_pairs(batch)[0].float()
        fused = self.encode(batch)
        if kind == "ner":
            emissions = self.tagger.emissions(fused.text_states, fused.pooled, batch["word_starts"])
            return self.tagger.decode(emissions, batch["word_mask"])
        logits = self.head(fused.pooled)
        if kind == "multilabel":
            return (torch.sigmoid(logits) > self.task.multilabel_threshold).long()
        return logits.argmax(-1)


def _output(task_loss: torch.Tensor, aux_loss: torch.Tensor | None, logits: torch.Tensor) -> TaskOutput:
    loss = task_loss if aux_loss is None else task_loss + aux_loss
    return TaskOutput(loss=loss, task_loss=task_loss, aux_loss=aux_loss, logits=logits)


def sample_negative_pairs(image_ids: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Row indices of the pairs to score: ``n`` matched, ``n*k`` with another caption, ``n*k`` with another image.

    Returns ``(image_of, caption_of)``, each ``[n + 2nk]``: pair p joins sample ``image_of[p]``'s
    regions with sample ``caption_of[p]``'s caption. Negatives come from samples of a different
    image (a batch may hold two captions of one image); failing that, from any other sample.
    """
    n = len(image_ids)
    others = image_ids[None, :] != image_ids[:, None]
    fallback = ~torch.eye(n, dtype=torch.bool, device=image_ids.device)
    allowed = torch.where(others.any(1, keepdim=True), others, fallback).float()
    draws = torch.multinomial(allowed.cpu(), k, replacement=True, generator=generator).to(image_ids.device)  # [n, k]
    rows = torch.arange(n, device=image_ids.device)
    anchors = rows.repeat_interleave(k)
    image_of = torch.cat([rows, anchors, draws.flatten()])  # negative images: another sample's regions
    caption_of = torch.cat([rows, draws.flatten(), anchors])  # negative captions: another sample's caption
    return image_of, caption_of


def pair_batch(batch: dict[str, Any], image_of: torch.Tensor, caption_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs joining the regions of ``image_of`` rows with the captions of ``caption_of`` rows."""
    return {
        "input_ids": batch["input_ids"][caption_of],
        "attention_mask": batch["attention_mask"][caption_of],
        "region_features": batch["region_features"][image_of],
        "region_geometry": batch["region_geometry"][image_of],
        "region_mask": batch["region_mask"][image_of],
        "region_blanked": batch["region_blanked"][image_of],
    }


def build_finetune_model(pretrained: ImageBertForPretraining, task: TaskConfig, fusion: FusionConfig) -> FinetuneModel:
    """The task model over the release's encoder; the pretraining heads are dropped, except that the
    retrieval scorer starts from the ITM head (``cross_modal``: from the representations' cosine)."""
    model = FinetuneModel(pretrained.config, task, fusion, encoder=pretrained.imagebert, cmg=pretrained.cmg)
    if fusion.name == "cross_modal" and task.name == "retrieval":
        model.fusion.start_from_cosine(model.head)
    elif task.name == "retrieval" and task.head_hidden == 0:
        model.head.init_from_itm(pretrained.itm_head)
    return model
