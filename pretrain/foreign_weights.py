"""VisualBERT's and UNITER's weights as ImageBERT weights (what ``python -m pretrain.convert`` loads).

Each source becomes an ``ImageBertConfig`` and a state dict in ``ImageBertForPretraining``'s
names, so that the converted model computes what the original computes (docs/pretrain.md,
*Importing VisualBERT and UNITER*). Most tensors are only renamed (a key map in the form of
``pretrain.model.BERT_KEY_MAPPING``); the rest are folded, exactly, into ours:

VisualBERT  regions are ``LayerNorm(visual_projection(f) + visual_token_type[1] + visual_position[0])``
            with the text's LayerNorm: no feature LayerNorm, no geometry, and their own type and
            position rows, two constants that go into ``feature_proj``'s bias (less the segment and
            region-position rows ImageBERT adds). Its sentence-image head says 0 for a match, ours 1.
UNITER      regions are ``LayerNorm'(LN(img_linear(f)) + LN(pos_linear(p7)) + token_type[1])``: a
            LayerNorm of their own and no position embedding (the region-position row is taken
            off ``geometry_norm``'s bias). ``p7 = M @ g`` for the shards' 5-d geometry ``g``, so
            ``geometry_proj`` is ``pos_linear @ M``. A masked region's feature is zeroed and given
            ``mask_embedding[1]``, a constant whose projection is our ``blank_feature``. The region
            regression head reads ``img_linear.weight`` transposed (a copy here, not tied).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.model import BERT_KEY_MAPPING, ImageBertConfig
from pretrain.weights import load_model, map_keys

# The BERT fields ImageBertConfig takes from a source config; the rest of a source config (its
# architecture, its visual fields) does not apply.
BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)

# UNITER's 7-d box position from the shards' 5-d geometry g = (x1/W, y1/H, x2/W, y2/H, area/(W*H)):
# (x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H)) = UNITER_POSITION_FROM_GEOMETRY @ g, because
# w = x2 - x1, h = y2 - y1 and the shards' area is w*h of the same box (preprocess.feature_format).
UNITER_POSITION_FROM_GEOMETRY = torch.tensor(
    [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [-1, 0, 1, 0, 0],
        [0, -1, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    dtype=torch.float64,
)

REGIONS = "imagebert.region_embeddings."
TEXT = "imagebert.bert.embeddings."

UNITER_KEY_MAPPING = {
    r"^uniter\.(embeddings|encoder|pooler)\.": r"imagebert.bert.\1.",
    r"^uniter\.img_embeddings\.img_linear\.": REGIONS + "feature_proj.",
    r"^uniter\.img_embeddings\.img_layer_norm\.": REGIONS + "feature_norm.",
    r"^uniter\.img_embeddings\.pos_linear\.bias": REGIONS + "geometry_proj.bias",
    r"^uniter\.img_embeddings\.pos_layer_norm\.weight": REGIONS + "geometry_norm.weight",
    r"^uniter\.img_embeddings\.LayerNorm\.": REGIONS + "own_norm.",
    r"^cls\.predictions\.(transform\.|bias)": r"mlm_head.\1",
    r"^feat_regress\.net\.0\.": "mrfr_head.transform.dense.",
    r"^feat_regress\.net\.2\.": "mrfr_head.transform.LayerNorm.",
    r"^feat_regress\.bias": "mrfr_head.out.bias",
    r"^region_classifier\.net\.0\.": "moc_head.transform.dense.",
    r"^region_classifier\.net\.2\.": "moc_head.transform.LayerNorm.",
    r"^region_classifier\.net\.3\.": "moc_head.out.",
    r"^itm_output\.": "itm_head.",
}

VISUALBERT_KEY_MAPPING = {
    r"^visual_bert\.": "bert.",  # then BERT's own map
    **BERT_KEY_MAPPING,
}


@dataclass
class Imported:
    config: ImageBertConfig
    weights: dict[str, torch.Tensor]  # in ImageBertForPretraining's names
    absent: list[str] = field(default_factory=list)  # patterns of our weights the source does not hold (initialised)
    notes: list[str] = field(default_factory=list)  # what the conversion left out, for the command to log


def _folded(*terms: torch.Tensor) -> torch.Tensor:
    """The sum of ``terms`` (signs applied by the caller) in float64, returned in the first's dtype."""
    return sum(t.double() for t in terms).to(terms[0].dtype)


# ----------------------------------------------------------------------------------------- VisualBERT


def visualbert_weights(source: str | Path, num_region_classes: int) -> Imported:
    """A ``transformers`` ``VisualBertForPreTraining`` or ``VisualBertModel`` directory."""
    from transformers import VisualBertConfig, VisualBertForPreTraining

    vb_config = VisualBertConfig.from_pretrained(source)
    if vb_config.model_type != "visual_bert":
        raise ValueError(f"{source}/config.json has model_type {vb_config.model_type!r}, not 'visual_bert'")
    if vb_config.bypass_transformer:
        raise ValueError(f"{source}/config.json has bypass_transformer: true, which ImageBERT's single stream cannot compute")
    architectures = vb_config.architectures or ["VisualBertModel"]
    if not set(architectures) <= {"VisualBertModel", "VisualBertForPreTraining"}:
        raise ValueError(f"{source}/config.json: architectures {architectures}; convert takes a VisualBertModel "
                         "or VisualBertForPreTraining directory")
    heads = "VisualBertForPreTraining" in architectures
    source_model = load_model(VisualBertForPreTraining, source, config=vb_config,
                              may_be_missing=[] if heads else [r"^cls\."], what=f"VisualBERT model {source}")
    weights = {k: v for k, v in source_model.state_dict().items() if not k.startswith("cls.predictions.decoder.")}
    if not heads:
        weights = {k: v for k, v in weights.items() if not k.startswith("cls.")}
    config = ImageBertConfig(
        **{name: getattr(vb_config, name) for name in BERT_FIELDS},
        feature_dim=vb_config.visual_embedding_dim, num_region_classes=num_region_classes,
        region_feature_norm=False, region_geometry=False,
    )
    visual = "visual_bert.embeddings."
    projection_bias = weights.pop(visual + "visual_projection.bias")
    visual_type = weights.pop(visual + "visual_token_type_embeddings.weight")[1]  # the visual segment, as VisualBERT's authors set it
    visual_position = weights.pop(visual + "visual_position_embeddings.weight")[0]  # every region's position without alignment
    text_type = weights[visual + "token_type_embeddings.weight"][1]
    text_position = weights[visual + "position_embeddings.weight"][config.region_position_id]
    ours = {
        REGIONS + "feature_proj.weight": weights.pop(visual + "visual_projection.weight"),
        REGIONS + "feature_proj.bias": _folded(projection_bias, visual_type, visual_position, -text_type, -text_position),
    }
    if heads:  # VisualBERT's sentence-image label 0 means "matches"; our ITM's 1 does
        ours["itm_head.weight"] = weights.pop("cls.seq_relationship.weight").flip(0)
        ours["itm_head.bias"] = weights.pop("cls.seq_relationship.bias").flip(0)
    absent = [r"blank_feature$", r"^(moc|mrfr)_head\."] + ([] if heads else [r"^(mlm|itm)_head\."])
    return Imported(config, {**map_keys(weights, VISUALBERT_KEY_MAPPING), **ours}, absent)


# --------------------------------------------------------------------------------------------- UNITER


def uniter_config(weights: dict[str, torch.Tensor], config_file: str | Path | None, num_region_classes: int) -> ImageBertConfig:
    """The sizes from the tensors' shapes; the rest from UNITER's model config JSON when given
    (``config/uniter-base.json``), else UNITER's defaults with 64-wide attention heads (base: 12, large: 16)."""
    text = "uniter.embeddings."
    vocab_size, hidden = weights[text + "word_embeddings.weight"].shape
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", k))}
    sizes = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=len(layers),
        intermediate_size=weights["uniter.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=weights[text + "position_embeddings.weight"].shape[0],
        type_vocab_size=weights[text + "token_type_embeddings.weight"].shape[0],
    )
    values = dict(num_attention_heads=hidden // 64, hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, initializer_range=0.02)
    if config_file is not None:
        given = json.loads(Path(config_file).read_text(encoding="utf-8"))
        wrong = [f"{k} {given[k]} vs {v} in the checkpoint" for k, v in sizes.items() if k in given and given[k] != v]
        if wrong:
            raise ValueError(f"UNITER config {config_file} does not fit the checkpoint: {'; '.join(wrong)}")
        values.update({k: given[k] for k in values if k in given})
    elif hidden % 64:
        raise ValueError(f"hidden size {hidden} is not a multiple of 64: give --uniter-config (UNITER's model config "
                         "JSON) for the number of attention heads")
    return ImageBertConfig(
        **sizes, **values, layer_norm_eps=1e-12, pad_token_id=0,  # UNITER's LayerNorms and padding row
        feature_dim=weights["uniter.img_embeddings.img_linear.weight"].shape[1],
        num_region_classes=num_region_classes, region_own_norm=True,
    )


def uniter_weights(
    weights: dict[str, torch.Tensor], num_region_classes: int, config_file: str | Path | None = None
) -> Imported:
    """A UNITER state dict (``UniterForPretraining``'s, or a ``UniterModel``'s without the ``uniter.`` prefix).
    LayerNorm tensors named ``gamma`` / ``beta`` (TensorFlow's names, which UNITER's loader renames) are read too."""
    if not any(k.startswith("uniter.") for k in weights):
        weights = {f"uniter.{k}": v for k, v in weights.items()}
    weights = {re.sub(r"\.beta$", ".bias", re.sub(r"\.gamma$", ".weight", k)): v for k, v in weights.items()}
    needed = ("uniter.embeddings.word_embeddings.weight", "uniter.img_embeddings.pos_linear.weight",
              "uniter.encoder.layer.0.intermediate.dense.weight", "uniter.img_embeddings.img_linear.weight")
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ValueError(f"not a UNITER state dict: no {missing[0]}")
    config = uniter_config(weights, config_file, num_region_classes)
    image = "uniter.img_embeddings."
    pos_linear = weights.pop(image + "pos_linear.weight")
    if tuple(pos_linear.shape[1:]) != (7,):
        raise ValueError(f"{image}pos_linear.weight has shape {tuple(pos_linear.shape)}; UNITER's box position is 7-d")
    img_linear_weight, img_linear_bias = weights[image + "img_linear.weight"], weights[image + "img_linear.bias"]
    mask_row = weights.pop(image + "mask_embedding.weight")[1]
    img_norm = torch.nn.functional.layer_norm(
        mask_row.double() @ img_linear_weight.double().T + img_linear_bias.double(), (config.hidden_size,),
        weights[image + "img_layer_norm.weight"].double(), weights[image + "img_layer_norm.bias"].double(), eps=1e-12,
    )
    region_position = weights["uniter.embeddings.position_embeddings.weight"][config.region_position_id]
    ours = {
        REGIONS + "geometry_proj.weight": (pos_linear.double() @ UNITER_POSITION_FROM_GEOMETRY).to(pos_linear.dtype),
        REGIONS + "geometry_norm.bias": _folded(weights.pop(image + "pos_layer_norm.bias"), -region_position),
        REGIONS + "blank_feature": img_norm.to(mask_row.dtype),
    }
    weights.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings, here and in UNITER
    absent, notes = [], []
    if "feat_regress.weight" in weights:  # the regression head reads img_linear's weight, transposed
        ours["mrfr_head.out.weight"] = weights.pop("feat_regress.weight").T.contiguous()
    classifier = weights.get("region_classifier.net.3.weight")
    if classifier is not None and classifier.shape[0] != num_region_classes:
        # A head for another label set predicts nothing the shards name; fine-tuning never reads it.
        notes.append(f"region_classifier predicts {classifier.shape[0]} classes, the feature spec has "
                     f"{num_region_classes}: the MOC head starts fresh")
        for key in [k for k in weights if k.startswith("region_classifier.")]:
            del weights[key]
    for head, prefix in (("mlm", "cls."), ("mrfr", "feat_regress."), ("moc", "region_classifier."), ("itm", "itm_output.")):
        if not any(k.startswith(prefix) for k in weights):
            absent.append(rf"^{head}_head\.")
    return Imported(config, {**map_keys(weights, UNITER_KEY_MAPPING), **ours}, absent, notes)
