"""The one way weights enter a model: ``transformers``' ``from_pretrained``, checked strictly.

A release, a run's consolidated DeepSpeed checkpoint, a fine-tuned export and a pretrained BERT
all load through ``load_model``: the library builds the model, ties its weights, initialises
what the source does not hold (``_init_weights``) and loads the rest; we then refuse any key
that is missing or left over unless the caller said it may be (a BERT has no region
embeddings; a truncated BERT has layers we drop).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import transformers
from transformers import PreTrainedModel

M = TypeVar("M", bound=PreTrainedModel)


def load_model(
    model_class: type[M],
    source: str | Path | None,
    *model_args,
    config=None,
    state_dict: dict[str, torch.Tensor] | None = None,
    key_mapping: dict[str, str] | None = None,
    may_be_missing: Iterable[str] = (),
    may_be_unused: Iterable[str] = (),
    what: str | None = None,
) -> M:
    """``model_class`` with the weights of ``source`` (a directory) or of ``state_dict`` (``source=None``).

    ``may_be_missing`` and ``may_be_unused`` are regular expressions over the model's (after
    ``key_mapping``) parameter names: missing keys matching the first are initialised, unused
    source keys matching the second are dropped; any other difference raises ``ValueError``
    naming ``what`` (default: the source). The model comes back in eval mode, in float32.
    """
    what = what or str(source)
    with quiet_transformers():
        model, info = model_class.from_pretrained(
            source, *model_args, config=config, state_dict=state_dict, key_mapping=key_mapping,
            dtype=torch.float32, output_loading_info=True,
        )
    missing = _unexpected(info["missing_keys"], may_be_missing)
    unused = _unexpected(info["unexpected_keys"], may_be_unused)
    if missing or unused or info["mismatched_keys"]:
        raise ValueError(
            f"{what} does not fit {model_class.__name__}: missing {missing[:5]}, unused {unused[:5]}, "
            f"wrong shape {sorted(info['mismatched_keys'])[:5]}"
        )
    return model


def map_keys(weights: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """``weights`` renamed by the first pattern of ``key_mapping`` each key matches (``re.sub``
    replacements); a key no pattern matches keeps its name, so ``load_model`` reports it unused."""
    patterns = [(re.compile(pattern), target) for pattern, target in key_mapping.items()]
    renamed = {}
    for key, tensor in weights.items():
        new = next((p.sub(target, key, count=1) for p, target in patterns if p.search(key)), key)
        if new in renamed:
            raise ValueError(f"two source weights map to {new} (the second is {key})")
        renamed[new] = tensor
    return renamed


def _unexpected(keys: Iterable[str], allowed: Iterable[str]) -> list[str]:
    patterns = [re.compile(p) for p in allowed]
    return sorted(k for k in keys if not any(p.search(k) for p in patterns))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load report or progress bars from transformers: ``load_model`` reports differences
    itself, as an error, and saving a model is one step of a command that reports its own."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
