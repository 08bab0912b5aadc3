"""The pretraining data pipeline: feature shards -> masked ImageBERT batches.

Training reads an endless stream: shards are drawn with replacement from one seeded
sequence that every rank and DataLoader worker shares, and each (rank, worker) keeps its
own slice of the draws, so the split is disjoint and a run is reproducible for a given
(seed, rank, num_workers). The tars are read by ``preprocess.shard_reader``. Samples are
shuffled in a buffer, decoded and tokenised in the workers, then batched there too: the collate
pads text and regions, draws ITM negatives from other samples of the batch and applies the
masking of ``pretrain.masking``.

Evaluation reads the validation shards once, in order, with a fixed masking seed, so two
evaluations compare and every rank builds the same batches; ``pretrain.evaluation`` then shares
them out over the ranks.

A sample that cannot be read (truncated or corrupt tar, missing member, wrong shapes, empty
caption) is skipped, logged (rate-limited) and counted per shard; the counts travel with the
batches to the trainer, which logs them and writes them into ``metrics.jsonl``. It never stops
training.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from preprocess import storage
from preprocess.captions import captions_of, image_id_of
from preprocess.feature_format import FeatureSpec, decode_feature_sample
from preprocess.launch_env import stop_safe_worker_init
from preprocess.shard_reader import tar_samples
from pretrain.data_config import DataConfig
from pretrain.masking import choose_modality, mask_regions, mask_text
from pretrain.masking_config import MaskingConfig

log = logging.getLogger(__name__)

# Stream ids mixed into seeds so the shuffle and the collate of one worker draw independent
# numbers. Integers, not strings: make_seed hashes its arguments and str hashes vary per process.
_SHUFFLE_STREAM = 1
_COLLATE_STREAM = 2


def feature_spec_of(shards: str, what: str = "shards") -> FeatureSpec:
    """The ``feature_spec.json`` beside the first shard of a brace pattern or ``::`` list (a local
    or bucket location), after checking that every shard exists: a pattern that names a missing
    shard stops the run at its start (``storage.StorageError`` naming it), not in a worker later."""
    first = storage.check_exist(shards, what)[0]
    return FeatureSpec.load(storage.parent(first))


def check_spec_matches_model(spec: FeatureSpec, model_config: Any, shards_name: str) -> None:
    """Raise ``ValueError`` if shards described by ``spec`` cannot feed a model built with ``model_config``."""
    diffs = []
    if spec.feature_dim != model_config.feature_dim:
        diffs.append(f"feature_dim {spec.feature_dim} vs model {model_config.feature_dim}")
    if spec.num_classes != model_config.num_region_classes:
        diffs.append(f"num_classes {spec.num_classes} vs model num_region_classes {model_config.num_region_classes}")
    if diffs:
        raise ValueError(
            f"feature_spec.json of {shards_name} does not match the model ({'; '.join(diffs)}): "
            "use shards extracted with the model's detector or build the model from these shards' spec"
        )


# ---------------------------------------------------------------- bad samples


class BadSampleHandler:
    """Skips bad samples: logs them (rate-limited), counts them per shard, and goes on.

    Called with the shard and the error by ``tar_samples`` (a shard cut short or corrupt counts
    once: what follows the damage cannot be read) and by ``decode_each`` (a sample that does not
    decode). In a DataLoader worker each worker counts its own; ``report_skipped`` hands the
    counts to the trainer with the batches.
    """

    def __init__(self, what: str, first: int = 5):
        self.what = what
        self.first = first  # log the first few, then only at powers of two
        self.count = 0
        self.unreported: Counter[str] = Counter()

    def __call__(self, shard: str, exn: BaseException) -> None:
        self.count += 1
        self.unreported[shard] += 1
        if self.count <= self.first or (self.count & (self.count - 1)) == 0:
            worker = get_worker_info()
            where = f"worker {worker.id}" if worker is not None else "main process"
            log.warning("%s: skipped bad sample #%d in %s: %s", self.what, self.count, where, exn)

    def take(self) -> dict[str, int]:
        """The counts by shard since the previous call."""
        taken, self.unreported = dict(self.unreported), Counter()
        return taken


def decode_each(decode: Callable[[dict[str, Any]], dict[str, Any]], bad: BadSampleHandler):
    """Pipeline stage: ``decode`` applied to each raw sample; one it raises on goes to ``bad``."""

    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in src:
            try:
                yield decode(raw)
            except Exception as exn:
                bad(raw.get("__url__", "?"), exn)

    return stage


def report_skipped(bad: BadSampleHandler):
    """Pipeline stage after batching: each batch carries, as ``skipped_samples``, the bad samples
    skipped since the previous batch by shard, for the trainer's logs and metrics."""

    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in src:
            batch["skipped_samples"] = bad.take()
            yield batch

    return stage


# ---------------------------------------------------------------- per-sample work (in the workers)


class SampleDecoder:
    """Raw webdataset sample -> decoded, truncated, tokenised sample dict (raises on bad input)."""

    def __init__(self, tokenizer, spec: FeatureSpec, data: DataConfig):
        self.tokenizer = tokenizer  # forked (or pickled) into each worker: one tokenizer per worker
        self.spec = spec
        self.data = data

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = decode_feature_sample(raw, self.spec.num_classes)
        where = f"sample {sample.key} in {raw.get('__url__', '?')}"
        n = sample.features.shape[0]
        if sample.features.ndim != 2 or sample.features.shape[1] != self.spec.feature_dim:
            raise ValueError(
                f"{where}: features shape {sample.features.shape}, spec feature_dim {self.spec.feature_dim}"
            )
        if n == 0:
            raise ValueError(f"{where}: no regions")
        if sample.geometry.shape != (n, 5) or sample.cls_prob.shape != (n, self.spec.num_classes):
            raise ValueError(
                f"{where}: geometry {sample.geometry.shape} / cls_prob {sample.cls_prob.shape} do not match "
                f"{n} regions and {self.spec.num_classes} classes"
            )
        caption = sample.caption.strip()
        if not caption:
            raise ValueError(f"{where}: empty caption")
        try:
            image_id, captions = image_id_of(sample.metadata), captions_of(caption, sample.metadata)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        tokens = self.tokenizer(
            caption, truncation=True, max_length=self.data.max_text_length, return_special_tokens_mask=True
        )
        keep = min(n, self.data.max_regions)  # regions come sorted by confidence
        return {
            "key": sample.key,
            "caption": caption,
            # The image's captions and id (preprocess.captions): what retrieval evaluation groups by.
            "captions": captions,
            "image_id": image_id,
            "input_ids": np.asarray(tokens["input_ids"], dtype=np.int64),
            "special_tokens_mask": np.asarray(tokens["special_tokens_mask"], dtype=bool),
            # Kept float16 (the batch too, see pad_samples): evaluation holds thousands of these. Views of the
            # tar member's buffer where that is writable (the shard reader's are), copies otherwise,
            # so the collate can hand them to torch.
            "features": np.require(sample.features[:keep], np.float16, ["C", "W"]),
            "geometry": np.require(sample.geometry[:keep], np.float32, ["C", "W"]),
            "cls_prob": np.require(sample.cls_prob[:keep], np.float16, ["C", "W"]),
        }


def _normalised_text(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.lower()).strip()


# ---------------------------------------------------------------- the collate (in the workers)


class PretrainCollate:
    """Samples -> one masked batch: ITM negatives, padding, masks.

    The random generator is created on first use inside each worker, seeded from
    (seed, rank, worker id), so workers never repeat each other's masks and a run is reproducible.
    """

    def __init__(self, tokenizer, data: DataConfig, masking: MaskingConfig, seed: int, rank: int = 0):
        self.pad_token_id = tokenizer.pad_token_id
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = tokenizer.vocab_size
        if self.pad_token_id is None or self.mask_token_id is None:
            raise ValueError("the tokenizer needs [PAD] and [MASK] tokens for pretraining")
        self.data = data
        self.masking = masking
        self.seed = seed
        self.rank = rank
        self.generator: torch.Generator | None = None

    def _generator(self) -> torch.Generator:
        if self.generator is None:
            worker = get_worker_info()
            worker_id = worker.id if worker is not None else 0
            seed = wds.utils.make_seed(self.seed, self.rank, worker_id, _COLLATE_STREAM)
            self.generator = torch.Generator().manual_seed(seed)
        return self.generator

    def draw_negatives(
        self, samples: list[dict[str, Any]], generator: torch.Generator
    ) -> tuple[list[int], torch.Tensor]:
        """For each sample, the index whose caption it gets, and ITM labels (1 matched, 0 negative).

        A negative caption comes from another sample of another image (another key, and another
        ``image_id`` where samples carry one: the same sample can appear twice when shards are
        resampled, and one image can have a sample per caption) and with different text; with no
        such sample in the batch the pair stays matched.
        """
        n = len(samples)
        keys = [image_of(s) for s in samples]
        texts = [_normalised_text(s["caption"]) for s in samples]
        want_negative = (torch.rand(n, generator=generator) < self.data.itm_negative_rate).tolist()
        caption_of = list(range(n))
        labels = [1] * n
        for i in range(n):
            if not want_negative[i]:
                continue
            candidates = [j for j in range(n) if keys[j] != keys[i] and texts[j] != texts[i]]
            if candidates:
                caption_of[i] = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
                labels[i] = 0
        return caption_of, torch.tensor(labels, dtype=torch.long)

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator | None = None) -> dict[str, Any]:
        """The masked inputs and targets, and the ITM pairs: with ``data.itm_pairs: unmasked``
        the masked inputs hold every sample's own caption and the ITM pairs come apart, unmasked,
        as ``itm_input_ids`` / ``itm_attention_mask``; with ``masked`` the masked inputs are the
        ITM pairs themselves (``pretrain.model.masked_rows`` says which rows the masked
        objectives score)."""
        generator = generator or self._generator()
        caption_of, itm_labels = self.draw_negatives(samples, generator)
        if self.data.itm_pairs == "unmasked":
            batch = pad_samples(samples, list(range(len(samples))), self.pad_token_id)
            itm_text = pad_captions([samples[j] for j in caption_of], self.pad_token_id)
            batch["itm_input_ids"], batch["itm_attention_mask"] = itm_text["input_ids"], itm_text["attention_mask"]
        else:
            batch = pad_samples(samples, caption_of, self.pad_token_id)
        mask_text_rows, mask_region_rows = choose_modality(len(samples), self.masking, generator)
        maskable = batch.pop("maskable") & mask_text_rows[:, None]
        batch["input_ids"], batch["mlm_labels"] = mask_text(
            batch["input_ids"], maskable, self.masking, self.mask_token_id, self.vocab_size, generator
        )
        region_maskable = batch["region_mask"].bool() & mask_region_rows[:, None]
        batch["region_blanked"], batch["region_masked"] = mask_regions(region_maskable, self.masking, generator)
        batch["itm_labels"] = itm_labels
        return batch


def _shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor; in a DataLoader worker, in shared memory from the start.

    The DataLoader hands a worker's batch to the main process by moving each tensor into a new
    shared-memory block, a second copy of it; at 32 x 36 x 2048 that cost a worker more time than
    decoding the batch. Filling shared memory directly is what torch's own ``default_collate``
    does in workers, and a tensor already there is handed over as it is.
    """
    if get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape).zero_()


def pad_captions(captions: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``maskable`` (real, non-special tokens), padded to
    the longest caption."""
    text_length = max(len(c["input_ids"]) for c in captions)
    input_ids = np.full((len(captions), text_length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(captions), text_length), dtype=np.int64)
    maskable = np.zeros((len(captions), text_length), dtype=bool)
    for i, caption in enumerate(captions):
        t = len(caption["input_ids"])
        input_ids[i, :t] = caption["input_ids"]
        attention_mask[i, :t] = 1
        maskable[i, :t] = ~caption["special_tokens_mask"]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "maskable": torch.from_numpy(maskable),
    }


def pad_regions(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``region_features``, ``region_geometry`` and ``region_mask`` of the samples, padded to the
    most regions among them."""
    n = len(samples)
    num_regions = max(len(s["features"]) for s in samples)
    geometry = np.zeros((n, num_regions, 5), dtype=np.float32)
    region_mask = np.zeros((n, num_regions), dtype=np.int64)
    # Features stay float16, as the shards store them: the model widens them where it computes
    # (on the GPU, for free), with the same values, while a float32 batch would double the bytes
    # each worker writes to shared memory and the host copies to the device.
    features = _shared_zeros((n, num_regions, samples[0]["features"].shape[1]), torch.float16)
    for i, sample in enumerate(samples):
        r = len(sample["features"])
        features[i, :r] = torch.from_numpy(sample["features"])
        geometry[i, :r] = sample["geometry"]
        region_mask[i, :r] = 1
    return {
        "region_features": features,
        "region_geometry": torch.from_numpy(geometry),
        "region_mask": torch.from_numpy(region_mask),
    }


def pad_samples(samples: list[dict[str, Any]], caption_of: list[int], pad_token_id: int) -> dict[str, Any]:
    """Unmasked padded tensors: sample i's regions with sample ``caption_of[i]``'s caption.

    Text is padded to the longest caption of the batch and regions to the most regions of the
    batch (not to the maxima of the config), so short batches cost less.
    """
    regions = pad_regions(samples)
    cls_prob = _shared_zeros((*regions["region_mask"].shape, samples[0]["cls_prob"].shape[1]), torch.float16)
    for i, sample in enumerate(samples):
        cls_prob[i, : len(sample["cls_prob"])] = torch.from_numpy(sample["cls_prob"])
    return {
        **pad_captions([samples[j] for j in caption_of], pad_token_id),
        **regions,
        "region_cls_prob": cls_prob,
        "keys": [s["key"] for s in samples],
    }


def image_of(sample: dict[str, Any]) -> tuple[str, Any]:
    """What tells a decoded sample's image from others: its ``image_id`` when the shards carry
    one (several samples may show one image), else its key."""
    return ("image_id", sample["image_id"]) if sample.get("image_id") is not None else ("key", sample["key"])


# ---------------------------------------------------------------- pipelines


def _one_stream_for_everyone() -> int:
    # ResampledShards' worker seed: the same for every rank and worker, so they all draw from
    # one sequence and the two split stages below hand each consumer a disjoint slice of it.
    return 0


def split_by_rank(rank: int, world_size: int):
    """Keep every ``world_size``-th item starting at ``rank``.

    webdataset's ``split_by_node`` reads the rank from the environment or torch.distributed,
    which a spawned DataLoader worker may not see; the trainer knows the rank, so pass it.
    """

    def stage(src: Iterable) -> Iterator:
        return itertools.islice(src, rank, None, world_size)

    return stage


def shuffle_per_worker(bufsize: int, seed: int, rank: int):
    """webdataset's shuffle with a generator seeded from (seed, rank, worker id) inside the worker."""

    def stage(src: Iterable) -> Iterator:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        rng = random.Random(wds.utils.make_seed(seed, rank, worker_id, _SHUFFLE_STREAM))
        return wds.shuffle(bufsize, initial=max(1, bufsize // 2), rng=rng)(src)

    return stage


def note_shard_sharing(shards: str, rank: int, world_size: int, num_workers: int) -> None:
    """Say (rank 0, once per loader) when fewer shards than consumers will share the draws.

    Not an error: shards are drawn with replacement, so every rank and worker is fed whatever
    the count; but consumers then read the same shards at the same time.
    """
    consumers = world_size * max(1, num_workers)
    count = len(storage.expand(shards))
    if rank == 0 and count < consumers:
        log.warning(
            "%s: %d shard(s) for %d ranks x %d workers: every worker is fed (shards are drawn with replacement), "
            "but several read the same shard at once; split the data into at least %d shards for more variety per batch",
            shards, count, world_size, max(1, num_workers), consumers,
        )


def shuffled_raw_samples(shards: str, shuffle_buffer: int, seed: int, rank: int, world_size: int, handler) -> list:
    """The head of every training pipeline (pretraining and fine-tuning): raw samples of one
    (rank, worker), drawn endlessly from the shards and shuffled."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return [
        wds.ResampledShards(shards, seed=seed, worker_seed=_one_stream_for_everyone, deterministic=True),
        # at this point we have an endless stream of {"url": shard}, identical on every rank and worker
        split_by_rank(rank, world_size),
        wds.split_by_worker,
        # at this point each (rank, worker) holds its own disjoint share of the shard draws
        tar_samples(handler),
        # at this point we have raw samples {"__key__", "txt", "features.npy", ...} as bytearrays
        shuffle_per_worker(shuffle_buffer, seed, rank),
    ]


def build_train_pipeline(
    shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, masking: MaskingConfig,
    seed: int, rank: int, world_size: int,
) -> wds.DataPipeline:
    """The endless training pipeline of one rank, yielding collated batches (run it in DataLoader workers)."""
    bad = BadSampleHandler(f"training shards {shards}")
    return wds.DataPipeline(
        *shuffled_raw_samples(shards, data.shuffle_buffer, seed, rank, world_size, bad),
        decode_each(SampleDecoder(tokenizer, spec, data), bad),
        # at this point we have tokenised samples with float16 region arrays
        wds.batched(data.batch_size, collation_fn=PretrainCollate(tokenizer, data, masking, seed, rank), partial=False),
        # at this point we have masked, padded batches with ITM negatives
        report_skipped(bad),
    )


def build_train_loader(
    shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, masking: MaskingConfig,
    seed: int, rank: int, world_size: int,
) -> Iterable[dict[str, torch.Tensor]]:
    """Endless loader of training batches for one rank (see the module docstring)."""
    note_shard_sharing(shards, rank, world_size, data.num_workers)
    pipeline = build_train_pipeline(shards, tokenizer, spec, data, masking, seed, rank, world_size)
    return DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches in the workers
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
        prefetch_factor=4 if data.num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=stop_safe_worker_init(),
    )


def eval_sample_stream(shards: str, tokenizer, spec: FeatureSpec, data: DataConfig) -> Iterator[dict]:
    """The decoded samples of the shards, each once, in shard order (bad ones logged and skipped)."""
    bad = BadSampleHandler(f"validation shards {shards}")
    return iter(wds.DataPipeline(
        wds.SimpleShardList(shards),
        # at this point we have each shard once, in the order given
        tar_samples(bad),
        decode_each(SampleDecoder(tokenizer, spec, data), bad),
        # at this point we have tokenised samples
    ))


def read_eval_samples(shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, max_samples: int) -> list[dict]:
    """The first ``max_samples`` decoded samples of the shards, in shard order."""
    samples = list(itertools.islice(eval_sample_stream(shards, tokenizer, spec, data), max_samples))
    if not samples:
        raise ValueError(f"validation shards {shards}: no readable sample")
    return samples


def collate_eval_batches(
    samples: list[dict], tokenizer, data: DataConfig, masking: MaskingConfig, seed: int
) -> list[dict]:
    """Masked batches with ITM negatives from a fixed seed: the same on every call (and every rank)."""
    collate = PretrainCollate(tokenizer, data, masking, seed)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(samples), data.batch_size):
        chunk = samples[start : start + data.batch_size]
        if len(chunk) >= 2:  # a lone sample has no other caption to pair with
            batches.append(collate(chunk, generator))
    return batches


def build_eval_batches(
    shards: str, tokenizer, spec: FeatureSpec, data: DataConfig, masking: MaskingConfig, seed: int, max_samples: int
) -> list[dict]:
    """Finite, deterministic validation batches (fixed masking seed)."""
    samples = read_eval_samples(shards, tokenizer, spec, data, max_samples)
    return collate_eval_batches(samples, tokenizer, data, masking, seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to ``device`` as they are: the model casts its inputs to its own precision,
    and targets (MRFR features, MOC distributions) keep theirs."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
