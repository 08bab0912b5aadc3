"""Several captions of one image: how a sample names its image and carries the image's captions.

A raw or feature sample's JSON may hold ``image_id`` (an integer shared by every sample of one
image) and ``captions`` (all of the image's captions; ``KEY.txt`` is then the first of them). Two
layouts use them, and every reader accepts both: one sample per image with all of its captions
(``python -m preprocess from-captions``, so each image is extracted once), and one sample per
(image, caption) pair sharing ``image_id`` (``python -m finetune.synth_tasks --task retrieval``).
Extraction passes the JSON through unchanged and puts ``image_id`` in the manifest; retrieval
evaluation ranks the distinct images against all of their captions (docs/preprocess.md).
No torch here: ``from-captions`` checks its arguments before torch is imported.
"""

from __future__ import annotations

from typing import Any

IMAGE_ID_FIELD = "image_id"
CAPTIONS_FIELD = "captions"


def image_id_of(meta: dict[str, Any]) -> int | None:
    """The sample's ``image_id``, None when its JSON has none; ``ValueError`` when it is not an integer."""
    value = meta.get(IMAGE_ID_FIELD)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{IMAGE_ID_FIELD} {value!r} is not an integer")
    return value


def captions_of(caption: str, meta: dict[str, Any]) -> list[str]:
    """The captions of the sample's image it carries: its JSON's ``captions`` (stripped) when present,
    else ``[caption]``; ``ValueError`` when ``captions`` is not a list of non-empty strings."""
    value = meta.get(CAPTIONS_FIELD)
    if value is None:
        return [caption]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise ValueError(f"{CAPTIONS_FIELD} must be a non-empty list of non-empty strings")
    return [c.strip() for c in value]
