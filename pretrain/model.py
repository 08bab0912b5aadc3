"""ImageBERT: one BERT encoder over ``[CLS] text [SEP] regions`` and its pretraining heads.

The encoder is transformers' ``BertModel`` (SDPA attention), initialised from a local
pretrained checkpoint or from a config. Regions enter as ``inputs_embeds``: the projected
ROI feature plus the projected 5-d geometry, each layer-normed; BERT's own embedding layer
then adds the segment embedding (text 0, regions 1) and the position embedding (text tokens
sequential, all regions one shared position, since regions are unordered), and applies its
LayerNorm. Model code takes tensors only: no DeepSpeed, no argparse, no environment.

The model's hyper-parameters live in a ``transformers.BertConfig`` with three extra fields
(``feature_dim``, ``num_region_classes``, ``region_position_id``), so a release's
``config.json`` is an ordinary BERT config that says how to embed regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLMPredictionHead, BertPredictionHeadTransform

GEOMETRY_DIM = 5
IGNORE_INDEX = -100


POOLINGS = ("cls", "mean")


def imagebert_config(
    bert_config: BertConfig, feature_dim: int, num_region_classes: int, pooling: str = "cls"
) -> BertConfig:
    """Copy of ``bert_config`` extended with the region fields ImageBERT needs."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    config = BertConfig.from_dict(bert_config.to_dict())
    config.feature_dim = int(feature_dim)
    config.num_region_classes = int(num_region_classes)
    config.summary_pooling = pooling
    # All regions share one position; the last row of the table is one text never reaches.
    config.region_position_id = config.max_position_embeddings - 1
    config._attn_implementation = "sdpa"
    return config


def check_region_config(config: BertConfig) -> None:
    missing = [k for k in ("feature_dim", "num_region_classes", "region_position_id") if not hasattr(config, k)]
    if missing:
        raise ValueError(f"model config lacks {missing}: build it with pretrain.model.imagebert_config")
    if config.type_vocab_size < 2:
        raise ValueError(f"type_vocab_size is {config.type_vocab_size}; ImageBERT needs 2 segments (text, regions)")


class ImageBertRegionEmbeddings(nn.Module):
    """LayerNorm(Linear(ROI feature)) + LayerNorm(Linear(5-d geometry)).

    A region whose feature is all zeros (a masked region: masking zeroes the feature, as in
    UNITER; or a degenerate detector output) gets the learned ``blank_feature`` in place of its
    feature term. LayerNorm(Linear(0)) = LayerNorm(bias) normalises a near-constant vector:
    with the bias at its zero init, its gradient was measured at ~1e5x every other parameter's,
    so global-norm clipping scaled the rest of the step below Adam's epsilon and ITM never left
    chance. Zero-initialised, so a masked region starts as its geometry alone.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.feature_proj = nn.Linear(config.feature_dim, config.hidden_size)
        self.feature_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.blank_feature = nn.Parameter(torch.zeros(config.hidden_size))
        self.geometry_proj = nn.Linear(GEOMETRY_DIM, config.hidden_size)
        self.geometry_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, region_features: torch.Tensor, region_geometry: torch.Tensor) -> torch.Tensor:
        dtype = self.feature_proj.weight.dtype
        region_features = region_features.to(dtype)
        blank = (region_features == 0).all(dim=-1, keepdim=True)
        features = self.feature_norm(self.feature_proj(region_features))
        features = torch.where(blank, self.blank_feature.to(dtype), features)
        geometry = self.geometry_norm(self.geometry_proj(region_geometry.to(dtype)))
        return features + geometry


@dataclass
class ImageBertOutput:
    sequence_output: torch.Tensor  # [B, T + R, H]: text positions first, then regions
    pooled_output: torch.Tensor  # [B, H]: BERT pooler on [CLS]
    text_length: int  # T, so regions are sequence_output[:, T:]


class ImageBertModel(nn.Module):
    """Single-stream encoder: BERT over text tokens followed by image regions."""

    def __init__(self, config: BertConfig, bert: BertModel | None = None):
        super().__init__()
        check_region_config(config)
        self.config = config
        self.bert = bert if bert is not None else BertModel(config, add_pooling_layer=True)
        self.region_embeddings = ImageBertRegionEmbeddings(config)
        init_new_modules(self.region_embeddings, config)

    @classmethod
    def from_pretrained_bert(
        cls, path: str, feature_dim: int, num_region_classes: int, pooling: str = "cls"
    ) -> "ImageBertModel":
        """Text side from a local Hugging Face BERT directory; region embeddings freshly initialised."""
        bert = BertModel.from_pretrained(path, add_pooling_layer=True, attn_implementation="sdpa")
        config = imagebert_config(bert.config, feature_dim, num_region_classes, pooling)
        bert.config = config
        return cls(config, bert=bert)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of text tokens (before position/segment/LayerNorm)."""
        return self.bert.embeddings.word_embeddings(input_ids)

    def embed_regions(self, region_features: torch.Tensor, region_geometry: torch.Tensor) -> torch.Tensor:
        """Region embeddings (before position/segment/LayerNorm)."""
        return self.region_embeddings(region_features, region_geometry)

    def finish_embeddings(self, inputs_embeds: torch.Tensor, segment: int, positions: torch.Tensor) -> torch.Tensor:
        """Add segment and position embeddings, then BERT's LayerNorm and dropout."""
        batch, length = inputs_embeds.shape[:2]
        token_type_ids = torch.full((batch, length), segment, dtype=torch.long, device=inputs_embeds.device)
        return self.bert.embeddings(
            inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, position_ids=positions.expand(batch, -1)
        )

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The summary the ITM and task heads read: BERT's pooler (dense + tanh) on [CLS]
        (ImageBERT, ``summary_pooling: cls``) or on the mean over the real positions (``mean``).

        ``mean`` is for text checkpoints whose [CLS] was never trained as a summary, such as
        sentence-transformers models (trained with mean pooling): in MiniLM-L6's first layers
        [CLS] barely moves with the input (swapping the image changed it by 0.07 %), so ITM
        stayed at chance; on the mean it learned within 100 steps (docs/pretrain.md).
        """
        if getattr(self.config, "summary_pooling", "cls") == "mean":
            return self.bert.pooler.activation(self.bert.pooler.dense(masked_mean(states, mask)))
        return self.bert.pooler(states)

    def text_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(length, device=device).unsqueeze(0)

    def region_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.full((1, length), self.config.region_position_id, dtype=torch.long, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] 1 for real tokens
        region_features: torch.Tensor,  # [B, R, D]
        region_geometry: torch.Tensor,  # [B, R, 5]
        region_mask: torch.Tensor,  # [B, R] 1 for real regions
    ) -> ImageBertOutput:
        if region_features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"region features have dim {region_features.shape[-1]} but the model expects "
                f"{self.config.feature_dim} (feature_spec.json of the shards vs the model config)"
            )
        text_length, region_length = input_ids.shape[1], region_features.shape[1]
        device = input_ids.device
        text = self.embed_text(input_ids)
        regions = self.embed_regions(region_features, region_geometry)
        inputs_embeds = torch.cat([text, regions.to(text.dtype)], dim=1)
        token_type_ids = torch.cat(
            [torch.zeros_like(input_ids), torch.ones(region_mask.shape, dtype=torch.long, device=device)], dim=1
        )
        position_ids = torch.cat(
            [self.text_positions(text_length, device), self.region_positions(region_length, device)], dim=1
        ).expand(input_ids.shape[0], -1)
        mask = torch.cat([attention_mask.long(), region_mask.long()], dim=1)
        out = self.bert(
            inputs_embeds=inputs_embeds, attention_mask=mask, token_type_ids=token_type_ids, position_ids=position_ids
        )
        return ImageBertOutput(out.last_hidden_state, self.pool(out.last_hidden_state, mask), text_length)


class RegionHead(nn.Module):
    """BERT-style transform (dense, GELU, LayerNorm) then a linear output: used by MOC and MRFR."""

    def __init__(self, config: BertConfig, out_dim: int):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.out = nn.Linear(config.hidden_size, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(hidden))


@dataclass
class PretrainingOutput:
    loss: torch.Tensor  # weighted sum of the enabled objectives
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per objective, unweighted
    # Counts for accuracy metrics (correct, total) per objective: summed over batches by evaluation.
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    itm_logits: torch.Tensor | None = None  # [B, 2]


@dataclass
class ObjectiveWeights:
    mlm: float = 1.0
    moc: float = 1.0
    mrfr: float = 1.0
    itm: float = 1.0
    moc_kl: bool = False  # False: cross-entropy to the detector's top label; True: KL to its distribution (UNITER)


class ImageBertForPretraining(nn.Module):
    """ImageBERT with MLM (tied to the word embeddings), MOC, MRFR and ITM heads.

    ``forward`` takes a batch from ``pretrain.data`` (already masked) and returns the losses.
    Masked-modelling losses count on matched pairs only (``itm_labels == 1``).
    """

    def __init__(self, config: BertConfig, encoder: ImageBertModel | None = None):
        super().__init__()
        self.imagebert = encoder if encoder is not None else ImageBertModel(config)
        self.config = self.imagebert.config
        self.mlm_head = BertLMPredictionHead(self.config)
        self.mlm_head.decoder.weight = self.imagebert.bert.embeddings.word_embeddings.weight
        self.moc_head = RegionHead(self.config, self.config.num_region_classes)
        self.mrfr_head = RegionHead(self.config, self.config.feature_dim)
        self.itm_head = nn.Linear(self.config.hidden_size, 2)
        for module in (self.mlm_head.transform, self.moc_head, self.mrfr_head, self.itm_head):
            init_new_modules(module, self.config)
        nn.init.zeros_(self.mlm_head.bias)

    def forward(self, batch: dict[str, torch.Tensor], weights: ObjectiveWeights | None = None) -> PretrainingOutput:
        weights = weights or ObjectiveWeights()
        enc = self.imagebert(
            batch["input_ids"],
            batch["attention_mask"],
            batch["region_features"],
            batch["region_geometry"],
            batch["region_mask"],
        )
        text_states = enc.sequence_output[:, : enc.text_length]
        region_states = enc.sequence_output[:, enc.text_length :]
        matched = batch["itm_labels"].bool()
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, tuple[int, int]] = {}

        # Only the selected positions go through the heads: the MLM vocabulary projection is the
        # most expensive matmul of the step and most positions are not masked.
        if weights.mlm:
            select = (batch["mlm_labels"] != IGNORE_INDEX) & matched[:, None]
            logits = self.mlm_head(text_states[select]).float()
            targets = batch["mlm_labels"][select]
            losses["mlm"] = _mean_or_zero(F.cross_entropy(logits, targets, reduction="sum"), len(targets), logits)
            counts["mlm"] = ((logits.argmax(-1) == targets).sum().item(), len(targets))

        select_regions = batch["region_masked"].bool() & batch["region_mask"].bool() & matched[:, None]
        if weights.moc:
            logits = self.moc_head(region_states[select_regions]).float()
            target_prob = batch["region_cls_prob"][select_regions].float()
            target_label = target_prob.argmax(-1)
            if weights.moc_kl:
                loss_sum = F.kl_div(F.log_softmax(logits, -1), target_prob, reduction="sum")
            else:
                loss_sum = F.cross_entropy(logits, target_label, reduction="sum")
            losses["moc"] = _mean_or_zero(loss_sum, len(target_label), logits)
            counts["moc"] = ((logits.argmax(-1) == target_label).sum().item(), len(target_label))
        if weights.mrfr:
            predicted = self.mrfr_head(region_states[select_regions]).float()
            target = batch["region_target_features"][select_regions].float()
            loss_sum = F.mse_loss(predicted, target, reduction="none").mean(-1).sum()
            losses["mrfr"] = _mean_or_zero(loss_sum, len(target), predicted)
        itm_logits = self.itm_head(enc.pooled_output).float()
        if weights.itm:
            losses["itm"] = F.cross_entropy(itm_logits, batch["itm_labels"].long())
            counts["itm"] = ((itm_logits.argmax(-1) == batch["itm_labels"]).sum().item(), len(itm_logits))

        total = sum(getattr(weights, name) * value for name, value in losses.items())
        return PretrainingOutput(loss=total, losses=losses, counts=counts, itm_logits=itm_logits)

    def itm_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        region_features: torch.Tensor,
        region_geometry: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Matching score per (text, image) pair: log-odds of 'matched'; used for retrieval ranking."""
        enc = self.imagebert(input_ids, attention_mask, region_features, region_geometry, region_mask)
        logits = self.itm_head(enc.pooled_output).float()
        return logits[:, 1] - logits[:, 0]


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` [B, N, H] over the positions where ``mask`` [B, N] is set."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _mean_or_zero(loss_sum: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    # A batch can hold no masked position of a kind; keep the graph connected so every rank
    # runs the same backward (DeepSpeed/DDP hang if one rank skips a parameter's gradient).
    if count == 0:
        return like.sum() * 0.0
    return loss_sum / count


def init_new_modules(module: nn.Module, config: BertConfig) -> None:
    """BERT's initialisation for modules that do not come from the pretrained checkpoint."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=config.initializer_range)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
