"""The fine-tuning data pipeline: task feature shards -> padded batches with task targets.

Task data are ordinary feature shards (``preprocess.feature_format``) whose sample JSON carries
the target:

==================  ===============================================================
task                JSON fields
==================  ===============================================================
classification,     ``label``: index into ``task.label_names``, or the name itself
sentiment
multilabel          ``target_labels``: list of indices or names
ner                 ``words`` (list of words; the caption is ``" ".join(words)``) and
                    ``tags`` (one BIO tag per word, names from ``task.label_names``)
retrieval           ``image_id`` (an image's samples share it); one sample per image-caption pair,
                    or per image with all of its ``captions`` (``preprocess.captions``):
                    training reads ``KEY.txt``, evaluation ranks every caption
==================  ===============================================================

NER tags live on words; the text is tokenised word by word and the model reads each word's
first word piece (``word_starts``), so the CRF runs over words and word-level entity F1 needs
no re-alignment. Training streams like pretraining (endless, resampled, disjoint per rank and
worker, bad samples logged and skipped); evaluation reads a shard set once, in order.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from finetune.config import DataConfig, TaskConfig
from preprocess.captions import captions_of
from preprocess.feature_format import FeatureSpec, decode_feature_sample
from preprocess.launch_env import stop_safe_worker_init
from preprocess.shard_reader import tar_samples
from pretrain.data import (
    BadSampleHandler,
    decode_each,
    note_shard_sharing,
    report_skipped,
    shuffled_raw_samples,
)
from pretrain.model import IGNORE_INDEX

log = logging.getLogger(__name__)



class TaskSampleDecoder:
    """Raw webdataset sample -> tokenised sample with its task target (raises naming the sample)."""

    def __init__(self, tokenizer, spec: FeatureSpec, data: DataConfig, task: TaskConfig):
        self.tokenizer = tokenizer
        self.spec = spec
        self.data = data
        self.task = task
        self.label_index = {name: i for i, name in enumerate(task.label_names)}

    def _label(self, value: Any, where: str) -> int:
        if isinstance(value, str):
            if value not in self.label_index:
                raise ValueError(f"{where}: label {value!r} is not in task.label_names {self.task.label_names}")
            return self.label_index[value]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.task.num_labels:
            raise ValueError(f"{where}: label {value!r} is not an index in [0, {self.task.num_labels})")
        return value

    def _field(self, meta: dict, name: str, where: str) -> Any:
        if name not in meta:
            raise ValueError(f"{where}: JSON has no {name!r} (task {self.task.name} needs it)")
        return meta[name]

    def _visible_text(self, input_ids) -> np.ndarray:
        """Token ids as the model may see them: with ``modalities: image`` words become [MASK] but keep
        their places, so NER still has a position per word."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if self.data.modalities != "image":
            return input_ids
        special = np.isin(input_ids, [self.tokenizer.cls_token_id, self.tokenizer.sep_token_id])
        return np.where(special, input_ids, self.tokenizer.mask_token_id)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = decode_feature_sample(raw, self.spec.num_classes)
        where = f"sample {sample.key} in {raw.get('__url__', '?')}"
        n = sample.features.shape[0]
        if sample.features.ndim != 2 or sample.features.shape[1] != self.spec.feature_dim or n == 0:
            raise ValueError(f"{where}: features shape {sample.features.shape}, expected [>=1, {self.spec.feature_dim}]")
        meta = sample.metadata
        out: dict[str, Any] = {"key": sample.key}
        if self.task.name == "ner":
            words = self._field(meta, "words", where)
            tags = self._field(meta, "tags", where)
            if not words or len(words) != len(tags):
                raise ValueError(f"{where}: {len(words)} words but {len(tags)} tags")
            tokens = self.tokenizer(
                [str(w) for w in words], is_split_into_words=True, truncation=True, max_length=self.data.max_text_length
            )
            starts, seen = [], set()
            for position, word in enumerate(tokens.word_ids()):
                if word is not None and word not in seen:
                    seen.add(word)
                    starts.append(position)
            # Words cut off by truncation are dropped with their tags (evaluation scores what remains).
            out["word_starts"] = np.asarray(starts, dtype=np.int64)
            out["tags"] = np.asarray([self._label(t, where) for t in tags[: len(starts)]], dtype=np.int64)
            input_ids = tokens["input_ids"]
        else:
            caption = sample.caption.strip()
            if not caption:
                raise ValueError(f"{where}: empty caption")
            input_ids = self.tokenizer(caption, truncation=True, max_length=self.data.max_text_length)["input_ids"]
            if self.task.name == "retrieval":
                out["image_id"] = int(self._field(meta, "image_id", where))
                try:  # every caption of the image the sample carries (preprocess.captions): evaluation's queries
                    captions = captions_of(caption, meta)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                # KEY.txt is the first of them when the JSON lists them: its tokens are reused.
                out["caption_input_ids"] = [
                    self._visible_text(input_ids if text == caption else self.tokenizer(
                        text, truncation=True, max_length=self.data.max_text_length)["input_ids"])
                    for text in captions
                ]
            if self.task.name in ("classification", "sentiment"):
                out["label"] = self._label(self._field(meta, "label", where), where)
            elif self.task.name == "multilabel":
                target = np.zeros(self.task.num_labels, dtype=np.float32)
                for value in self._field(meta, "target_labels", where):
                    target[self._label(value, where)] = 1.0
                out["target"] = target
        input_ids = self._visible_text(input_ids)
        keep = min(n, self.data.max_regions)
        features = np.ascontiguousarray(sample.features[:keep], dtype=np.float16)
        geometry = np.ascontiguousarray(sample.geometry[:keep], dtype=np.float32)
        blanked = self.data.modalities == "text"
        if blanked:
            # One blanked region with an empty box: every image looks the same, so nothing about it
            # reaches the model (the model puts its blank embedding in place of the feature).
            features = np.zeros((1, features.shape[1]), dtype=np.float16)
            geometry = np.zeros((1, 5), dtype=np.float32)
        out.update(input_ids=input_ids, features=features, geometry=geometry, blanked=blanked)
        return out


class TaskCollate:
    """Samples -> one batch: text and regions padded to the batch's longest, targets stacked."""

    def __init__(self, pad_token_id: int, task: TaskConfig):
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(samples)
        text_length = max(len(s["input_ids"]) for s in samples)
        num_regions = max(len(s["features"]) for s in samples)
        feature_dim = samples[0]["features"].shape[1]
        batch: dict[str, Any] = {
            "input_ids": torch.full((n, text_length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, text_length), dtype=torch.long),
            "region_features": torch.zeros((n, num_regions, feature_dim), dtype=torch.float32),
            "region_geometry": torch.zeros((n, num_regions, 5), dtype=torch.float32),
            "region_mask": torch.zeros((n, num_regions), dtype=torch.long),
            "region_blanked": torch.zeros((n, num_regions), dtype=torch.bool),
            "keys": [s["key"] for s in samples],
        }
        for i, s in enumerate(samples):
            t, r = len(s["input_ids"]), len(s["features"])
            batch["input_ids"][i, :t] = torch.from_numpy(s["input_ids"])
            batch["attention_mask"][i, :t] = 1
            batch["region_features"][i, :r] = torch.from_numpy(s["features"].astype(np.float32))
            batch["region_geometry"][i, :r] = torch.from_numpy(s["geometry"])
            batch["region_mask"][i, :r] = 1
            batch["region_blanked"][i, :r] = s["blanked"]
        kind = self.task.name
        if kind in ("classification", "sentiment"):
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        elif kind == "multilabel":
            batch["labels"] = torch.from_numpy(np.stack([s["target"] for s in samples]))
        elif kind == "retrieval":
            batch["image_ids"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.long)
        elif kind == "ner":
            words = max(len(s["tags"]) for s in samples)
            batch["word_starts"] = torch.zeros((n, words), dtype=torch.long)
            batch["tags"] = torch.full((n, words), IGNORE_INDEX, dtype=torch.long)
            batch["word_mask"] = torch.zeros((n, words), dtype=torch.bool)
            for i, s in enumerate(samples):
                w = len(s["tags"])
                batch["word_starts"][i, :w] = torch.from_numpy(s["word_starts"][:w])
                batch["tags"][i, :w] = torch.from_numpy(s["tags"])
                batch["word_mask"][i, :w] = True
        return batch


def build_train_pipeline(
    shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, task: TaskConfig, seed: int, rank: int, world_size: int
) -> wds.DataPipeline:
    """The endless training stream of one rank, yielding batches (runs in DataLoader workers)."""
    bad = BadSampleHandler(f"training shards {shards}")
    return wds.DataPipeline(
        *shuffled_raw_samples(shards, data.shuffle_buffer, seed, rank, world_size, bad),
        decode_each(TaskSampleDecoder(tokenizer, spec, data, task), bad),
        # at this point we have tokenised samples with their targets
        wds.batched(data.batch_size, collation_fn=TaskCollate(tokenizer.pad_token_id, task), partial=False),
        report_skipped(bad),
    )


def build_train_loader(
    shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, task: TaskConfig, seed: int, rank: int, world_size: int
) -> DataLoader:
    note_shard_sharing(shards, rank, world_size, data.num_workers)
    pipeline = build_train_pipeline(shards, tokenizer, spec, data, task, seed, rank, world_size)
    return DataLoader(
        pipeline, batch_size=None, num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
        pin_memory=torch.cuda.is_available(), worker_init_fn=stop_safe_worker_init(),
    )


def read_samples(shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, task: TaskConfig, max_samples: int = 0) -> list[dict]:
    """Every decoded sample of ``shards`` (the first ``max_samples`` when > 0), in shard order."""
    bad = BadSampleHandler(f"shards {shards}")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        tar_samples(bad),
        decode_each(TaskSampleDecoder(tokenizer, spec, data, task), bad),
    )
    samples = list(itertools.islice(pipeline, max_samples) if max_samples else pipeline)
    if not samples:
        raise ValueError(f"shards {shards}: no readable sample")
    return samples
