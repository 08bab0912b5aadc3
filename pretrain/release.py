"""The release directory: what pretraining hands to fine-tuning and to users.

``RELEASE_DIR/config.json``       ``ImageBertConfig`` (``model_type: imagebert``): a BERT config
                                  plus ``feature_dim``, ``num_region_classes``,
                                  ``region_position_id``, ``summary_pooling`` and the region
                                  switches (``region_feature_norm``, ``region_geometry``,
                                  ``region_own_norm``; ImageBERT's unless converted)
``RELEASE_DIR/model.safetensors`` weights of ``ImageBertForPretraining`` (encoder and the four
                                  pretraining heads; the tied MLM decoder is stored once)
``RELEASE_DIR/tokenizer*.json, vocab.txt, ...``  the tokenizer (``AutoTokenizer`` files)
``RELEASE_DIR/feature_spec.json`` the feature spec of the shards the model was trained on

The first two are what ``save_pretrained`` writes, so with ``pretrain.model`` imported,
``AutoModel.from_pretrained(RELEASE_DIR)`` gives the encoder and
``ImageBertForPretraining.from_pretrained(RELEASE_DIR)`` the whole model. Loading needs only
torch, transformers and safetensors: no DeepSpeed, no run directory.

Releases written before the model became a ``transformers`` model (``model_type: bert`` with the
region fields, and a separate MLM decoder bias) still load: ``load_release`` converts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from preprocess.atomic import replace_directory
from preprocess.feature_format import FEATURE_SPEC_FILE, FeatureSpec
from pretrain.model import ImageBertConfig, ImageBertForPretraining
from pretrain.weights import load_model, quiet_transformers

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class Release:
    model: ImageBertForPretraining
    tokenizer: PreTrainedTokenizerBase
    feature_spec: FeatureSpec
    path: Path


def save_release(
    model: ImageBertForPretraining, tokenizer: PreTrainedTokenizerBase, feature_spec: FeatureSpec, out_dir: str | Path
) -> Path:
    """Write a release atomically: built in a sibling temporary directory, then renamed into place."""
    with replace_directory(out_dir) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        feature_spec.save(tmp)
    return Path(out_dir)


def load_release(path: str | Path) -> Release:
    """Load a release directory written by ``save_release`` (``python -m pretrain.export``), in eval mode."""
    path = Path(path)
    config = read_release_config(path)
    if config.get("model_type") == ImageBertConfig.model_type:
        model = load_model(ImageBertForPretraining, path, what=f"release {path}")
    else:
        model = _load_first_layout(path, config)
    return Release(model=model, tokenizer=AutoTokenizer.from_pretrained(path), feature_spec=FeatureSpec.load(path), path=path)


def read_release_config(path: str | Path) -> dict:
    """The release's ``config.json`` as a dict, after checking that ``path`` holds a release
    (cheap: no weights read, no torch needed)."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE, FEATURE_SPEC_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a release directory: {name} is missing")
    return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))


def _load_first_layout(path: Path, config: dict) -> ImageBertForPretraining:
    """A release of the first layout: a ``bert`` config with the region fields, and weights in which
    the MLM decoder has its own bias (``mlm_head.bias`` was an unused zero vector)."""
    from safetensors.torch import load_file

    if "feature_dim" not in config:
        raise ValueError(f"{path / CONFIG_FILE} is a {config.get('model_type')!r} config without region fields: not a release")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "_attn_implementation")}
    weights = load_file(str(path / WEIGHTS_FILE))
    weights["mlm_head.bias"] = weights.pop("mlm_head.decoder.bias")
    return load_model(
        ImageBertForPretraining, None, config=ImageBertConfig(**fields), state_dict=weights,
        what=f"release {path} (first layout)",
    )
