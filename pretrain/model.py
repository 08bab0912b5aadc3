"""ImageBERT: one BERT encoder over ``[CLS] text [SEP] regions``, and its pretraining heads.

These are ``transformers`` models. ``ImageBertConfig`` is a ``BertConfig`` with the region
fields and a ``model_type`` of its own; ``ImageBertModel`` (the encoder) and
``ImageBertForPretraining`` (the encoder with the MLM, MOC, MRFR and ITM heads) are
``PreTrainedModel``s: ``save_pretrained`` / ``from_pretrained`` write and read a release, the
library ties the MLM decoder to the word embeddings and initialises every module through
``_init_weights``. Importing this module registers them, so ``AutoConfig`` / ``AutoModel`` /
``AutoModelForPreTraining.from_pretrained(RELEASE)`` work.

The encoder is transformers' ``BertModel`` (SDPA attention; training on a CPU draws dropout's
masks cheaply, ``pretrain.cpu_dropout``). Regions enter as ``inputs_embeds``:
the projected ROI feature plus the projected 5-d geometry, each layer-normed; BERT's own
embedding layer then adds the segment embedding (text 0, regions 1) and the position embedding
(text tokens sequential, all regions one shared position, since regions are unordered), and
applies its LayerNorm. Model code takes tensors only: no DeepSpeed, no argparse, no environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    BertConfig,
    BertModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertLMPredictionHead, BertPredictionHeadTransform

from pretrain import cpu_dropout
from pretrain.cmg import CMGObjectives, SharedCodebook
from pretrain.model_config import (
    CMG_LOSSES, POOLINGS, STAGE_OBJECTIVES, CMGConfig, ObjectiveWeights, complete_module_fields,
)

GEOMETRY_DIM = 5
IGNORE_INDEX = -100


class ImageBertConfig(BertConfig):
    """A BERT config plus what it takes to embed regions.

    ``feature_dim``: ROI feature width; ``num_region_classes``: detector classes (the MOC
    target); ``region_position_id``: the one position every region shares (default: the last
    row of the position table, which text never reaches); ``summary_pooling``: what the ITM and
    task heads read, BERT's pooler on [CLS] (``cls``, ImageBERT) or on the mean over the real
    positions (``mean``, for checkpoints trained with mean pooling).

    Three switches let a converted release (``pretrain.convert``) compute exactly what its
    original computes; their defaults are ImageBERT's: ``region_feature_norm`` (a LayerNorm on
    the projected feature; VisualBERT has none), ``region_geometry`` (the 5-d geometry term;
    VisualBERT embeds no boxes) and ``region_own_norm`` (regions get a final LayerNorm of their
    own in place of BERT's embedding LayerNorm, as in UNITER).

    ``cmg``: the shape and switches of CMG's modules (``CMGConfig.module_fields``: ``num_codes``,
    ``code_dim``, ``decay``, ``dead_after``, ``multimodal_ema``, ``code_reset``; a switch missing,
    as in a release written before it existed, is its default), or None (the default) for a model
    without them.
    """

    model_type = "imagebert"

    def __init__(
        self,
        feature_dim: int = 2048,
        num_region_classes: int = 1601,
        region_position_id: int | None = None,
        summary_pooling: str = "cls",
        region_feature_norm: bool = True,
        region_geometry: bool = True,
        region_own_norm: bool = False,
        cmg: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if summary_pooling not in POOLINGS:
            raise ValueError(f"summary_pooling must be one of {list(POOLINGS)}, got {summary_pooling!r}")
        if self.type_vocab_size < 2:
            raise ValueError(f"type_vocab_size is {self.type_vocab_size}; ImageBERT needs 2 segments (text, regions)")
        self.feature_dim = int(feature_dim)
        self.num_region_classes = int(num_region_classes)
        self.summary_pooling = summary_pooling
        self.region_feature_norm = bool(region_feature_norm)
        self.region_geometry = bool(region_geometry)
        self.region_own_norm = bool(region_own_norm)
        self.cmg = complete_module_fields(cmg) if cmg else None
        last = self.max_position_embeddings - 1
        self.region_position_id = last if region_position_id is None else int(region_position_id)

    @classmethod
    def from_bert(cls, bert: BertConfig, **fields) -> "ImageBertConfig":
        """``bert``'s values with the region fields (and any other overrides) in ``fields``."""
        values = {k: v for k, v in bert.to_dict().items() if k not in ("model_type", "architectures")}
        return cls(**{**values, **fields})


class ImageBertRegionEmbeddings(nn.Module):
    """LayerNorm(Linear(ROI feature)) + LayerNorm(Linear(5-d geometry)).

    A masked region (``region_blanked``, set by the masking in ``pretrain.data``) gets the
    learned ``blank_feature`` in place of its feature term, so only its box is seen. Masking by
    zeroing the feature instead (UNITER) gives LayerNorm(Linear(0)) = LayerNorm(bias), a
    near-constant vector whose bias gradient was measured at ~1e5x every other parameter's:
    global-norm clipping then scaled the rest of the step below Adam's epsilon and ITM never
    left chance. Zero-initialised, so a masked region starts as its geometry alone.

    The config's region switches drop the feature LayerNorm or the geometry term, or add
    ``own_norm``, the regions' final LayerNorm (``ImageBertModel.embed_regions`` applies it).
    """

    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.feature_proj = nn.Linear(config.feature_dim, config.hidden_size)
        if config.region_feature_norm:
            self.feature_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.feature_norm = nn.Identity()
        self.blank_feature = nn.Parameter(torch.zeros(config.hidden_size))
        self.embeds_geometry = config.region_geometry
        if config.region_geometry:
            self.geometry_proj = nn.Linear(GEOMETRY_DIM, config.hidden_size)
            self.geometry_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.own_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.region_own_norm else None

    def forward(
        self, region_features: torch.Tensor, region_geometry: torch.Tensor, region_blanked: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = self.feature_proj.weight.dtype
        features = self.feature_norm(self.feature_proj(region_features.to(dtype)))
        if region_blanked is not None:
            features = torch.where(region_blanked.bool().unsqueeze(-1), self.blank_feature.to(dtype), features)
        if not self.embeds_geometry:
            return features
        geometry = self.geometry_norm(self.geometry_proj(region_geometry.to(dtype)))
        return features + geometry


class ImageBertPreTrainedModel(PreTrainedModel):
    config_class = ImageBertConfig
    base_model_prefix = "imagebert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # SDPA, except that training on a CPU draws the attention dropout's mask cheaply (pretrain.cpu_dropout).
        chosen = super().get_correct_attn_implementation(requested_attention, is_init_check)
        return cpu_dropout.ATTENTION if chosen == "sdpa" else chosen

    def _init_weights(self, module: nn.Module) -> None:
        # The library's default: Linear and Embedding normal(0, initializer_range), LayerNorm (1, 0).
        super()._init_weights(module)
        if isinstance(module, ImageBertRegionEmbeddings):
            init.zeros_(module.blank_feature)
        elif isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, SharedCodebook):
            # Buffers the library does not know: a model loaded without them (from a BERT)
            # would keep whatever memory it got. init.copy_ leaves loaded ones alone.
            for name, value in module.initial_state().items():
                init.copy_(getattr(module, name), value.to(getattr(module, name).device))


@dataclass
class ImageBertOutput:
    last_hidden_state: torch.Tensor  # [B, T + R, H]: text positions first, then regions
    pooler_output: torch.Tensor  # [B, H]: the summary (``ImageBertModel.pool``)
    text_length: int  # T, so regions are last_hidden_state[:, T:]


class ImageBertModel(ImageBertPreTrainedModel):
    """Single-stream encoder: BERT over text tokens followed by image regions."""

    def __init__(self, config: ImageBertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=True)
        self.region_embeddings = ImageBertRegionEmbeddings(config)
        cpu_dropout.use_cpu_dropout(self)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = value

    # ------------------------------------------------------------ embedding streams (fusion builds on these)

    def embed_tokens(self, input_ids: torch.Tensor, segment: int) -> torch.Tensor:
        """Embedded tokens ``[B, T, H]`` at positions 0..T-1 in ``segment`` (0 text, 1 image), BERT's LayerNorm applied."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        segments = torch.full_like(input_ids, segment)
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=segments, position_ids=positions)

    def embed_regions(
        self, region_features: torch.Tensor, region_geometry: torch.Tensor, region_blanked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embedded regions ``[B, R, H]``: segment 1, the one shared region position, BERT's LayerNorm applied."""
        batch, length = region_features.shape[:2]
        inputs = self.region_embeddings(region_features, region_geometry, region_blanked)
        positions = torch.full((batch, length), self.config.region_position_id, device=inputs.device)
        segments = torch.ones((batch, length), dtype=torch.long, device=inputs.device)
        inputs = inputs.to(self.get_input_embeddings().weight.dtype)
        own_norm = self.region_embeddings.own_norm
        if own_norm is None:
            return self.bert.embeddings(inputs_embeds=inputs, token_type_ids=segments, position_ids=positions)
        # BertEmbeddings' sum, normalised by the regions' own LayerNorm (region_own_norm, UNITER).
        text = self.bert.embeddings
        summed = inputs + text.token_type_embeddings(segments) + text.position_embeddings(positions)
        return text.dropout(own_norm(summed))

    def encode_alone(self, embedded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's states ``[B, N, H]`` over one embedded sequence (``embed_tokens``,
        ``embed_regions`` or both concatenated); ``mask`` [B, N] is 1 at the real positions."""
        attention = create_bidirectional_mask(config=self.config, inputs_embeds=embedded, attention_mask=mask.long())
        return self.bert.encoder(embedded, attention_mask=attention).last_hidden_state

    def encode_each_alone(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        region_features: torch.Tensor, region_geometry: torch.Tensor, region_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states ``[B, T, H]``, region states ``[B, R, H]``): the caption alone and the
        regions alone through the encoder, neither attending to the other (CMG's unimodal inputs)."""
        text = self.encode_alone(self.embed_tokens(input_ids, segment=0), attention_mask)
        regions = self.encode_alone(self.embed_regions(region_features, region_geometry), region_mask)
        return text, regions

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The summary the ITM and task heads read: BERT's pooler (dense + tanh) on token 0
        (``summary_pooling: cls``, ImageBERT) or on the mean over the real positions (``mean``).

        ``mean`` is for text checkpoints whose [CLS] was never trained as a summary, such as
        sentence-transformers models (trained with mean pooling): in MiniLM-L6's first layers
        [CLS] barely moves with the input (swapping the image changed it by 0.07 %), so ITM
        stayed at chance; on the mean it learned within 100 steps (docs/pretrain.md).
        """
        if self.config.summary_pooling == "mean":
            return self.bert.pooler.activation(self.bert.pooler.dense(masked_mean(states, mask)))
        return self.bert.pooler(states)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] 1 for real tokens
        region_features: torch.Tensor,  # [B, R, D]
        region_geometry: torch.Tensor,  # [B, R, 5]
        region_mask: torch.Tensor,  # [B, R] 1 for real regions
        region_blanked: torch.Tensor | None = None,  # [B, R] True where the model must not see the feature
    ) -> ImageBertOutput:
        check_feature_dim(region_features, self.config)
        if self.config.region_own_norm:
            return self._forward_own_region_norm(
                input_ids, attention_mask, region_features, region_geometry, region_mask, region_blanked
            )
        batch, text_length = input_ids.shape
        region_length = region_features.shape[1]
        device = input_ids.device
        # Raw embeddings of both modalities; BertModel adds segments and positions and normalises.
        text = self.get_input_embeddings()(input_ids)
        regions = self.region_embeddings(region_features, region_geometry, region_blanked)
        segments = torch.cat(
            [torch.zeros_like(input_ids), torch.ones((batch, region_length), dtype=torch.long, device=device)], dim=1
        )
        positions = torch.cat(
            [
                torch.arange(text_length, device=device),
                torch.full((region_length,), self.config.region_position_id, device=device),
            ]
        ).expand(batch, -1)
        mask = torch.cat([attention_mask.long(), region_mask.long()], dim=1)
        out = self.bert(
            inputs_embeds=torch.cat([text, regions.to(text.dtype)], dim=1),
            attention_mask=mask, token_type_ids=segments, position_ids=positions,
        )
        states = out.last_hidden_state
        return ImageBertOutput(states, self.pool(states, mask), text_length)

    def _forward_own_region_norm(
        self, input_ids, attention_mask, region_features, region_geometry, region_mask, region_blanked
    ) -> ImageBertOutput:
        """``forward`` when regions have a LayerNorm of their own: BertModel would normalise the
        joint sequence with its embedding LayerNorm, so each stream is embedded by itself and the
        encoder runs on both."""
        embedded = torch.cat(
            [self.embed_tokens(input_ids, segment=0), self.embed_regions(region_features, region_geometry, region_blanked)],
            dim=1,
        )
        mask = torch.cat([attention_mask.long(), region_mask.long()], dim=1)
        states = self.encode_alone(embedded, mask)
        return ImageBertOutput(states, self.pool(states, mask), input_ids.shape[1])


def check_feature_dim(region_features: torch.Tensor, config: ImageBertConfig) -> None:
    if region_features.shape[-1] != config.feature_dim:
        raise ValueError(
            f"region features have dim {region_features.shape[-1]} but the model expects "
            f"{config.feature_dim} (feature_spec.json of the shards vs the model config)"
        )


def build_cmg_objectives(config: ImageBertConfig) -> CMGObjectives | None:
    """CMG's modules of the shape ``config.cmg`` records (``CMGConfig.module_fields``), freshly
    initialised; None when the model has no CMG (``config.cmg`` unset)."""
    if not config.cmg:
        return None
    dim = config.cmg["code_dim"]
    return CMGObjectives(
        config.hidden_size, num_codes=config.cmg["num_codes"], code_dim=dim, specific_dim=dim,
        club_hidden=dim, cpc_context=dim, decay=config.cmg["decay"], dead_after=config.cmg["dead_after"],
        multimodal_ema=config.cmg["multimodal_ema"], code_reset=config.cmg["code_reset"],
    )


class RegionHead(nn.Module):
    """BERT-style transform (dense, GELU, LayerNorm) then a linear output: used by MOC and MRFR."""

    def __init__(self, config: ImageBertConfig, out_dim: int):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.out = nn.Linear(config.hidden_size, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(hidden))


@dataclass
class PretrainingOutput:
    loss: torch.Tensor  # weighted sum of the enabled objectives
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per objective, unweighted
    # Per objective (correct predictions, positions scored): the count stays a tensor so the
    # training step never waits for the device; evaluation sums them.
    counts: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    # CMG's codebook usage and Cross-CPC accuracy (``cmg_*``), when the model has CMG's modules.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


# Where a BERT checkpoint's weights go in ImageBertForPretraining: the encoder (saved by BertModel
# or by BertForPreTraining) and the MLM head's transform and bias (BertForPreTraining only).
BERT_KEY_MAPPING = {
    r"^bert\.": "imagebert.bert.",
    r"^(embeddings|encoder|pooler)\.": r"imagebert.bert.\1.",
    r"^cls\.predictions\.(transform\.|bias)": r"mlm_head.\1",
}


class ImageBertForPretraining(ImageBertPreTrainedModel):
    """ImageBERT with MLM (decoder tied to the word embeddings), MOC, MRFR and ITM heads.

    ``forward`` takes a batch from ``pretrain.data`` (already masked) and returns the losses.
    Masked-modelling losses count on matched pairs only (``masked_rows``). A batch with
    ``itm_input_ids`` (``data.itm_pairs: unmasked``, ImageBERT's and UNITER's way) gets ITM from
    those unmasked pairs, encoded as second sequences in the same encoder call (``_encode``);
    otherwise ITM reads the masked inputs.

    With ``config.cmg`` set the model also holds CMG's objectives (``self.cmg``,
    ``pretrain.cmg.CMGObjectives``), computed on two more encoder passes, one over each sample's
    caption alone and one over its regions alone (``cmg_losses``); their losses are named
    ``cmg_<loss>``.
    """

    _tied_weights_keys = {
        "mlm_head.decoder.weight": "imagebert.bert.embeddings.word_embeddings.weight",
        "mlm_head.decoder.bias": "mlm_head.bias",
    }

    def __init__(self, config: ImageBertConfig):
        super().__init__(config)
        self.imagebert = ImageBertModel(config)
        self.mlm_head = BertLMPredictionHead(config)
        self.moc_head = RegionHead(config, config.num_region_classes)
        self.mrfr_head = RegionHead(config, config.feature_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        # Built only when configured: a model without CMG draws no extra random numbers and has
        # exactly the parameters it had before CMG existed.
        self.cmg = build_cmg_objectives(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    @classmethod
    def from_bert(
        cls, path: str | Path, feature_dim: int, num_region_classes: int, pooling: str = "cls",
        num_layers: int | None = None, cmg: dict | None = None,
    ) -> "ImageBertForPretraining":
        """Text side (and, from a ``BertForPreTraining`` checkpoint, the MLM head) from a local
        Hugging Face BERT directory; region embeddings, the other heads and CMG's modules (``cmg``:
        ``ImageBertConfig.cmg``) freshly initialised. ``num_layers`` keeps only the first N encoder layers."""
        from pretrain.weights import load_model

        bert = BertConfig.from_pretrained(path)
        if num_layers is not None and not 1 <= num_layers <= bert.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers} but {path} has {bert.num_hidden_layers} layers")
        config = ImageBertConfig.from_bert(
            bert, feature_dim=feature_dim, num_region_classes=num_region_classes, summary_pooling=pooling,
            num_hidden_layers=num_layers or bert.num_hidden_layers, cmg=cmg,
        )
        kept = config.num_hidden_layers
        return load_model(
            cls, path, config=config, key_mapping=BERT_KEY_MAPPING,
            may_be_missing=[r"^imagebert\.region_embeddings\.", r"^(mlm|moc|mrfr|itm)_head\.", r"^cmg\."],
            may_be_unused=[rf"^imagebert\.bert\.encoder\.layer\.(?!({'|'.join(map(str, range(kept)))})\.)", r"^cls\."],
            what=f"BERT checkpoint {path}",
        )

    def forward(
        self, batch: dict[str, torch.Tensor], weights: ObjectiveWeights | None = None,
        cmg_weights: CMGConfig | None = None, objectives: str = "all",
    ) -> PretrainingOutput:
        """The losses of ``batch``: the masked objectives and ITM, each weighted by ``weights``,
        and with CMG's modules CMG's losses, each weighted by ``cmg_weights`` (default:
        ``CMGConfig``'s weights). ``objectives`` (a stage's, ``STAGE_OBJECTIVES``): "all" both,
        "masked" not CMG's, "cmg" CMG's alone (no multimodal pass at all)."""
        if objectives not in STAGE_OBJECTIVES:
            raise ValueError(f"objectives must be one of {list(STAGE_OBJECTIVES)}, got {objectives!r}")
        if objectives == "cmg" and self.cmg is None:
            raise ValueError("objectives 'cmg' needs a model with CMG's modules (config.cmg; cmg.enabled in pretraining)")
        weights = weights or ObjectiveWeights()
        losses, counts = ({}, {}) if objectives == "cmg" else self._masked_losses(batch, weights)
        total = sum(getattr(weights, name) * value for name, value in losses.items())
        stats: dict[str, torch.Tensor] = {}
        if self.cmg is not None and objectives != "masked":
            cmg_config = cmg_weights or CMGConfig()
            cmg_losses, stats = self.cmg_losses(batch, train_encoder=cmg_config.encoder_gradients)
            cmg_weights = cmg_config.loss_weights()
            for name in CMG_LOSSES:
                losses[f"cmg_{name}"] = cmg_losses[name]
                total = total + cmg_weights[name] * cmg_losses[name]
        return PretrainingOutput(loss=total, losses=losses, counts=counts, stats=stats)

    def _masked_losses(
        self, batch: dict[str, torch.Tensor], weights: ObjectiveWeights,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
        """The unweighted loss of each masked objective and ITM with a weight, and (correct, scored) counts."""
        states, itm_summary = self._encode(batch, with_itm_pairs=bool(weights.itm) and "itm_input_ids" in batch)
        text_states = states[:, : batch["input_ids"].shape[1]]
        region_states = states[:, states.shape[1] - batch["region_features"].shape[1] :]
        matched = masked_rows(batch)
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, tuple[torch.Tensor, int]] = {}

        # Only the selected positions go through the heads: the MLM vocabulary projection is the
        # most expensive matmul of the step and most positions are not masked.
        if weights.mlm:
            select = (batch["mlm_labels"] != IGNORE_INDEX) & matched[:, None]
            logits = self.mlm_head(text_states[select]).float()
            targets = batch["mlm_labels"][select]
            losses["mlm"] = _mean_or_zero(F.cross_entropy(logits, targets, reduction="sum"), len(targets), logits)
            counts["mlm"] = ((logits.argmax(-1) == targets).sum(), len(targets))

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
            counts["moc"] = ((logits.argmax(-1) == target_label).sum(), len(target_label))
        if weights.mrfr:
            predicted = self.mrfr_head(region_states[select_regions]).float()
            target = batch["region_features"][select_regions].float()  # the features before masking
            loss_sum = F.mse_loss(predicted, target, reduction="none").mean(-1).sum()
            losses["mrfr"] = _mean_or_zero(loss_sum, len(target), predicted)
        if weights.itm:
            itm_logits = self.itm_head(itm_summary).float()
            losses["itm"] = F.cross_entropy(itm_logits, batch["itm_labels"].long())
            counts["itm"] = ((itm_logits.argmax(-1) == batch["itm_labels"]).sum(), len(itm_logits))
        return losses, counts

    def set_trainable(self, objectives: str) -> None:
        """``requires_grad`` on the parameters a stage with ``objectives`` (``STAGE_OBJECTIVES``)
        trains, off on the rest: all of them ("all"), all but CMG's modules ("masked"), CMG's
        modules alone ("cmg"). Frozen parameters are in no optimizer group."""
        for name, param in self.named_parameters():
            param.requires_grad_(objectives == "all" or name.startswith("cmg.") == (objectives == "cmg"))

    def _encode(self, batch: dict[str, torch.Tensor], with_itm_pairs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's states over the masked inputs [B, T' + R] (text first, padded to T' >= T)
        and the summary ITM reads [B, H]: that of the masked inputs, or with ``with_itm_pairs`` that
        of the unmasked ITM pairs (``itm_input_ids`` with the same regions, none blanked).

        The two sequences of each sample go through one encoder call over 2B rows rather than two
        calls over B: every row attends only to itself, so the result is the same, and the step
        takes 0.96x the time (quickstart shape, bf16, docs/benchmarks.md). Captions are padded
        to the longer of the two lengths; padding is masked out of attention and pooling."""
        if not with_itm_pairs:
            enc = self.imagebert(
                batch["input_ids"], batch["attention_mask"], batch["region_features"], batch["region_geometry"],
                batch["region_mask"], batch["region_blanked"],
            )
            return enc.last_hidden_state, enc.pooler_output
        rows = len(batch["input_ids"])
        length = max(batch["input_ids"].shape[1], batch["itm_input_ids"].shape[1])
        pad = self.config.pad_token_id or 0

        def padded(text: torch.Tensor, value: int = 0) -> torch.Tensor:
            missing = length - text.shape[1]
            return F.pad(text, (0, missing), value=value) if missing else text

        def twice(tensor: torch.Tensor) -> torch.Tensor:
            # Not torch.cat: under CPU autocast it rejects the float16 region features.
            return tensor.repeat(2, *[1] * (tensor.dim() - 1))

        enc = self.imagebert(
            torch.cat([padded(batch["input_ids"], pad), padded(batch["itm_input_ids"], pad)]),
            torch.cat([padded(batch["attention_mask"]), padded(batch["itm_attention_mask"])]),
            twice(batch["region_features"]), twice(batch["region_geometry"]), twice(batch["region_mask"]),
            torch.cat([batch["region_blanked"], torch.zeros_like(batch["region_blanked"])]),
        )
        return enc.last_hidden_state[:rows], enc.pooler_output[rows:]

    def cmg_losses(
        self, batch: dict[str, torch.Tensor], train_encoder: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """CMG's unweighted losses and ``cmg_*`` statistics (``CMGObjectives``), from one encoder
        pass over each sample's caption alone and one over its regions alone. The passes run
        without gradient unless ``train_encoder`` (``cmg.encoder_gradients``): CMG's modules learn
        on the encoder's features as they are, as CMG's learn on frozen pretrained encoders'; and
        then without dropout too, the features a frozen encoder gives (and a fine-tuning head reads).

        Both passes read the sample before masking (the caption's masked tokens restored from the
        MLM labels, every region's feature seen): CMG encodes what is there, not a cloze. Only the
        ``masked_rows`` count: a negative pair's caption does not describe its regions, and the
        codebook's cross-modal EMA and Cross-CPC need pairs that do."""
        encoder = self.imagebert
        rows = masked_rows(batch)
        if not rows.any():
            return self._cmg_without_pairs(len(rows), batch["input_ids"].device)
        caption = torch.where(batch["mlm_labels"] != IGNORE_INDEX, batch["mlm_labels"], batch["input_ids"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder), _dropout_off(encoder, not train_encoder):
            text_states, region_states = encoder.encode_each_alone(
                caption, batch["attention_mask"], batch["region_features"], batch["region_geometry"], batch["region_mask"]
            )
        losses, stats = self.cmg(
            text_states, batch["attention_mask"].bool() & rows[:, None],
            region_states, batch["region_mask"].bool() & rows[:, None], batch["region_geometry"],
        )
        return losses, {f"cmg_{name}": value for name, value in stats.items()}

    def _cmg_without_pairs(self, batch_size: int, device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A batch with no pair to learn from (only negatives under ``itm_pairs: masked``): zero
        losses still connected to every CMG parameter, and in training an EMA step with no vector
        of this rank's, so that every rank runs the same backward and the same all-reduces (a
        rank that skipped them would leave the others waiting)."""
        zero = sum(p.sum() for p in self.cmg.parameters()) * 0.0
        stats: dict[str, torch.Tensor] = {}
        if self.training:
            none = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
            vectors = torch.zeros(batch_size, 1, self.cmg.codebook.embedding.shape[1], device=device)
            stats = {"cross_cpc_accuracy": zero.detach(), **self.cmg.codebook.update(vectors, none, vectors, none)}
        return dict.fromkeys(CMG_LOSSES, zero), {f"cmg_{name}": value for name, value in stats.items()}

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
        logits = self.itm_head(enc.pooler_output).float()
        return logits[:, 1] - logits[:, 0]


@contextlib.contextmanager
def _dropout_off(module: nn.Module, off: bool) -> Iterator[None]:
    """``module`` in eval mode inside the block when ``off``, then back in the mode it was in."""
    was_training = module.training
    if off:
        module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def masked_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: the rows whose masked positions the masked objectives score. Every row when the
    ITM pairs come apart (``itm_input_ids``: the masked inputs are each sample with its own
    caption), else the matched pairs only: a negative's caption does not describe its regions."""
    if "itm_input_ids" in batch:
        return torch.ones_like(batch["itm_labels"], dtype=torch.bool)
    return batch["itm_labels"].bool()


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


AutoConfig.register(ImageBertConfig.model_type, ImageBertConfig)
AutoModel.register(ImageBertConfig, ImageBertModel)
AutoModelForPreTraining.register(ImageBertConfig, ImageBertForPretraining)
