"""``python -m pretrain.convert --from {visualbert,uniter} SRC --out RELEASE_DIR --feature-spec SPEC [--tokenizer DIR]``

Turns a released VisualBERT (a ``transformers`` ``VisualBertModel`` or ``VisualBertForPreTraining``
directory) or UNITER (its PyTorch state dict) into a release directory (``pretrain.release``)
that ``python -m finetune --init`` takes with every fusion strategy, and that computes what the
original computes (``pretrain.foreign_weights``). ``SPEC`` is the ``feature_spec.json`` (or the
directory holding it) of the feature shards the model will read: their features must be the
kind the model was trained on, with its feature dimension. The tokenizer comes from the
VisualBERT directory when it holds one, else from ``--tokenizer`` (UNITER: always).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("pretrain.convert")

SOURCES = ("visualbert", "uniter")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_arguments(kind: str, source: Path, tokenizer: Path | None, uniter_config: Path | None) -> Path:
    """Everything that can be checked without torch; returns the tokenizer directory to use."""
    if kind not in SOURCES:
        raise ValueError(f"--from {kind!r}: convert takes one of {list(SOURCES)}")
    if kind == "visualbert" and not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a VisualBERT model directory: {source / 'config.json'} is missing")
    if kind == "uniter" and not source.is_file():
        raise FileNotFoundError(f"{source}: no such UNITER checkpoint file")
    if uniter_config is not None:
        if kind != "uniter":
            raise ValueError("--uniter-config is for --from uniter only (a VisualBERT directory has its own config.json)")
        try:
            json.loads(uniter_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"--uniter-config {uniter_config}: not a readable JSON file ({err})") from None
    if tokenizer is None:
        if kind == "visualbert" and _has_tokenizer(source):
            return source
        where = f"{source} holds no tokenizer files" if kind == "visualbert" else "a UNITER checkpoint holds no tokenizer"
        raise ValueError(f"{where}: give --tokenizer DIR (the BERT tokenizer the model was trained with)")
    if not _has_tokenizer(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return tokenizer


def convert(
    kind: str, source: str | Path, out: str | Path, feature_spec: str | Path,
    tokenizer: str | Path | None = None, uniter_config: str | Path | None = None,
) -> Path:
    """Write the release of ``source`` (a ``kind`` model) to ``out``; returns ``out``."""
    source = Path(source)
    tokenizer_dir = check_arguments(kind, source, Path(tokenizer) if tokenizer else None,
                                    Path(uniter_config) if uniter_config else None)
    from preprocess.feature_format import FeatureSpec

    spec = FeatureSpec.load(feature_spec)  # before the imports below (seconds): a wrong path is reported at once

    import torch
    from transformers import AutoTokenizer

    from pretrain import foreign_weights
    from pretrain.model import ImageBertForPretraining
    from pretrain.release import save_release
    from pretrain.weights import load_model

    if kind == "visualbert":
        imported = foreign_weights.visualbert_weights(source, spec.num_classes)
        what = f"VisualBERT model {source}"
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with code, a truncated file: torch raises many kinds
            first_line = (str(err).strip().splitlines() or [""])[0]  # torch's messages run to several lines
            raise ValueError(f"{source}: not a PyTorch state dict ({err.__class__.__name__}: {first_line})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{source}: not a state dict (a mapping of names to tensors)")
        imported = foreign_weights.uniter_weights(state, spec.num_classes, uniter_config)
        what = f"UNITER checkpoint {source}"
    if imported.config.feature_dim != spec.feature_dim:
        raise ValueError(f"{what} takes {imported.config.feature_dim}-d region features but the feature spec "
                         f"{feature_spec} has feature_dim {spec.feature_dim}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tok) > imported.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens but {what} embeds only {imported.config.vocab_size}")
    model = load_model(ImageBertForPretraining, None, config=imported.config, state_dict=imported.weights,
                       may_be_missing=imported.absent, what=what)
    for note in imported.notes:
        log.warning("%s: %s", what, note)
    out = save_release(model, tok, spec, out)
    log.info("converted %s to %s", what, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", nargs=2, metavar=("KIND", "SRC"), required=True,
                        help="visualbert DIR (a transformers VisualBERT directory) or uniter FILE (a UNITER state dict)")
    parser.add_argument("--out", required=True, help="the release directory to write (replaced atomically)")
    parser.add_argument("--feature-spec", required=True,
                        help="feature_spec.json, or the feature-shard directory holding it, of the shards the model will read")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the VisualBERT directory's)")
    parser.add_argument("--uniter-config", default=None,
                        help="UNITER's model config JSON (default: sizes from the checkpoint, 64-wide attention heads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kind, source = args.source
    try:
        out = convert(kind, source, args.out, args.feature_spec, args.tokenizer, args.uniter_config)
    except (FileNotFoundError, ValueError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
