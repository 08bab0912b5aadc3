"""The release directory: what pretraining hands to fine-tuning and to users.

``RELEASE_DIR/config.json``       BERT config plus the region fields (``feature_dim``,
                                  ``num_region_classes``, ``region_position_id``,
                                  ``summary_pooling``: cls or mean, absent means cls)
``RELEASE_DIR/model.safetensors`` weights of ``ImageBertForPretraining`` (encoder and the
                                  four pretraining heads; the MLM decoder is tied to the word
                                  embeddings and stored once)
``RELEASE_DIR/tokenizer*.json, vocab.txt, ...``  the tokenizer (``AutoTokenizer`` files)
``RELEASE_DIR/feature_spec.json`` the feature spec of the shards the model was trained on

Loading needs only torch, transformers and safetensors: no DeepSpeed, no run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from preprocess.feature_format import FEATURE_SPEC_FILE, FeatureSpec
from pretrain.model import ImageBertForPretraining, check_region_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Stored once: the MLM decoder shares the word-embedding matrix.
TIED_KEY = "mlm_head.decoder.weight"


@dataclass
class Release:
    model: ImageBertForPretraining
    tokenizer: PreTrainedTokenizerBase
    feature_spec: FeatureSpec
    path: Path


def save_release(
    model: ImageBertForPretraining,
    tokenizer: PreTrainedTokenizerBase,
    feature_spec: FeatureSpec,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a release atomically: build it in a sibling temp dir, then rename into place.

    ``state_dict`` overrides the model's own weights (e.g. consolidated from a ZeRO checkpoint).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k != TIED_KEY}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        feature_spec.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def load_release(path: str | Path, dtype: torch.dtype = torch.float32) -> Release:
    """Load a release directory written by ``save_release`` (or ``python -m pretrain.export``)."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE, FEATURE_SPEC_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a release directory: {name} is missing")
    config = BertConfig.from_pretrained(path)
    check_region_config(config)
    config._attn_implementation = "sdpa"
    model = ImageBertForPretraining(config)
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != TIED_KEY and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Release(model=model, tokenizer=tokenizer, feature_spec=FeatureSpec.load(path), path=path)
