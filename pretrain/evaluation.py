"""Validation of a pretraining run: masked-modelling and ITM metrics, zero-shot retrieval.

Masked modelling and ITM run on the first ``max_samples`` held-out samples, masked with a
fixed seed and paired with in-batch negatives (so the numbers of two evaluations compare).
Zero-shot retrieval takes the first N held-out images (``retrieval_candidates``; 0: all) with all
of their captions, as ImageBERT's 1K/5K protocol does: samples are grouped into images by their
``image_id`` where the shards carry one, each sample's ``captions`` all count (``preprocess.captions``),
and a sample without either is an image with one caption. The images are the gallery and the
captions the queries; every (image, caption) pair is scored with the ITM head
(``model.itm_scores``) and ranked by ``pretrain.retrieval``, so another caption of the right
image is a hit. Accuracies and recalls are percent. ``python -m pretrain.evaluate`` runs this
same evaluation on a release.

Retrieval streams: the gallery's images (float16 regions) and tokenised captions are padded once
and the pairs are built batch by batch from them, so memory grows with images + captions, never
with images x captions.

The forwards are shared out over the ranks and the sums reduced (``pretrain.distributed``), so
every rank returns the same metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from preprocess.feature_format import FeatureSpec
from pretrain.data import (
    check_spec_matches_model,
    collate_eval_batches,
    eval_sample_stream,
    image_of,
    pad_captions,
    pad_regions,
    to_device,
)
from pretrain.data_config import DataConfig
from pretrain.distributed import all_reduce_sum, shard
from pretrain.evaluate_config import EvalConfig
from pretrain.masking_config import MaskingConfig
from pretrain.model import IGNORE_INDEX, ImageBertForPretraining, masked_rows
from pretrain.model_config import CMG_LOSSES, ObjectiveWeights
from pretrain.retrieval import RECALL_AT, group_by_image, recall_at_k

# Validation masks and negatives are drawn from this seed, never from the training seed.
EVAL_SEED = 1234


@torch.no_grad()
def masked_modelling_metrics(
    model: ImageBertForPretraining, batches: list[dict], device, objectives: ObjectiveWeights,
    show_progress: bool = False,
) -> dict[str, float]:
    """Accuracies (percent) and mean losses of MLM/MOC/MRFR/ITM over the validation batches, and
    of CMG's losses (``cmg_<loss>_loss``) where the model has CMG's modules."""
    weights = dataclasses.replace(objectives, mlm=1.0, moc=1.0, mrfr=1.0, itm=1.0)
    accuracies, losses = ("mlm", "moc", "itm"), ("mlm", "moc", "mrfr", "itm")
    if model.config.cmg:
        losses += tuple(f"cmg_{name}" for name in CMG_LOSSES)
    names = [f"{n}_correct" for n in accuracies] + [f"{n}_seen" for n in accuracies]
    names += [f"{n}_loss_sum" for n in losses] + [f"{n}_loss_count" for n in losses] + ["positives"]
    sums = dict.fromkeys(names, 0.0)
    for index in tqdm(shard(len(batches)), desc="eval masked modelling", disable=not show_progress, leave=False):
        batch = batches[0 if index is None else index]
        out = model(to_device(batch, device), weights)
        if index is None:  # a padding forward: every rank runs as many (ZeRO-3)
            continue
        scored = masked_rows(batch)
        # What each loss is averaged over inside the model (masked positions of the rows it
        # scores), so that batch means combine into the mean over the whole validation set.
        masked_regions = int((batch["region_masked"] & batch["region_mask"].bool() & scored[:, None]).sum())
        count = {
            "mlm": int(((batch["mlm_labels"] != IGNORE_INDEX) & scored[:, None]).sum()),
            "moc": masked_regions, "mrfr": masked_regions, "itm": len(scored),
            # CMG's losses are means over positions of both modalities (sums of a mean per
            # modality); the pairs they score weigh each batch.
            **{f"cmg_{name}": int(scored.sum()) for name in CMG_LOSSES},
        }
        for name, (correct, seen) in out.counts.items():
            sums[f"{name}_correct"] += float(correct)
            sums[f"{name}_seen"] += seen
        for name, loss in out.losses.items():
            sums[f"{name}_loss_sum"] += float(loss) * count[name]
            sums[f"{name}_loss_count"] += count[name]
        sums["positives"] += int(batch["itm_labels"].sum())
    total = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)).tolist()
    sums = dict(zip(names, total))
    metrics = {f"{n}_acc": 100.0 * sums[f"{n}_correct"] / max(sums[f"{n}_seen"], 1) for n in accuracies}
    metrics |= {f"{n}_loss": sums[f"{n}_loss_sum"] / max(sums[f"{n}_loss_count"], 1) for n in losses}
    share = sums["positives"] / max(sums["itm_seen"], 1)
    metrics["itm_chance"] = 100.0 * max(share, 1.0 - share)  # always answering the majority label
    metrics["num_eval_samples"] = sums["itm_seen"]
    return metrics


@dataclass
class Gallery:
    """A retrieval gallery: decoded samples standing for the images, and every caption of them."""

    images: list[dict]  # one decoded sample per image (its regions)
    captions: list[dict]  # {"input_ids", "special_tokens_mask"} per caption
    caption_image: torch.Tensor  # [C] the image of each caption

    @property
    def num_pairs(self) -> int:
        """Pairs ``recall_at_k`` scores: every image with every caption, and the positives once more."""
        return len(self.images) * len(self.captions) + len(self.captions)


def retrieval_gallery(samples: Iterable[dict], tokenizer, max_text_length: int, max_images: int) -> Gallery:
    """The first ``max_images`` images (0: all) of decoded samples with all of their captions.

    Reading stops at the first sample of image ``max_images + 1``: an image's samples should be
    consecutive (they are in both layouts), else its later captions are not queries.
    """
    images: dict = {}
    captions, caption_images = [], []
    for sample in samples:
        image = image_of(sample)
        if image not in images:
            if max_images and len(images) == max_images:
                break
            # Regions only: the class distributions (320 KB an image at 100 x 1600) are not needed here.
            images[image] = {k: sample[k] for k in ("key", "image_id", "features", "geometry")}
        texts = sample["captions"]
        if texts == [sample["caption"]]:
            captions.append(sample)  # already tokenised
        else:
            tokens = tokenizer(texts, truncation=True, max_length=max_text_length, return_special_tokens_mask=True)
            captions += [
                {"input_ids": np.asarray(ids, dtype=np.int64), "special_tokens_mask": np.asarray(special, dtype=bool)}
                for ids, special in zip(tokens["input_ids"], tokens["special_tokens_mask"])
            ]
        caption_images += [image] * len(texts)
    _, caption_image = group_by_image(caption_images)  # images numbered as ``images`` holds them
    return Gallery(list(images.values()), captions, caption_image)


@torch.no_grad()
def zero_shot_retrieval(
    model: ImageBertForPretraining, gallery: Gallery, pad_token_id: int, device, batch_size: int,
    show_progress: bool = False,
) -> dict[str, float]:
    """Recall@K of ranking the gallery's images and captions with the ITM score (``pretrain.retrieval``)."""
    regions = to_device(pad_regions(gallery.images), device)  # float16: the model casts them
    text = to_device(pad_captions(gallery.captions, pad_token_id), device)

    def score_batch(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        images, captions = images.to(device), captions.to(device)
        return model.itm_scores(
            text["input_ids"][captions], text["attention_mask"][captions], regions["region_features"][images],
            regions["region_geometry"][images], regions["region_mask"][images],
        )

    with tqdm(total=gallery.num_pairs, desc="eval retrieval", unit="pair", disable=not show_progress, leave=False) as bar:
        return recall_at_k(
            score_batch, gallery.caption_image, len(gallery.images), batch_size, device=device, progress=bar.update
        )


def evaluate(
    model: ImageBertForPretraining, shards: str, tokenizer, spec: FeatureSpec, data: DataConfig,
    masking: MaskingConfig, eval_cfg: EvalConfig, device, objectives: ObjectiveWeights | None = None,
    show_progress: bool = False, timings: dict | None = None,
) -> dict[str, float]:
    """All validation metrics of ``model`` on held-out ``shards``; call it on every rank.

    Returns mlm_acc, moc_acc, itm_acc (percent), the four ``*_loss`` values (mrfr_loss among
    them), itm_chance, num_eval_samples, and ``pretrain.retrieval.recall_at_k``'s fields:
    i2t_r1/5/10, t2i_r1/5/10, rsum, their ``*_chance`` levels, num_images and num_captions;
    with CMG's modules, also ``cmg_<loss>_loss`` for each of CMG's losses.
    ``timings``, when given, receives the seconds of each part and the retrieval's pair count.
    """
    check_spec_matches_model(spec, model.config, shards)
    eval_data = dataclasses.replace(data, batch_size=eval_cfg.batch_size)
    stream = eval_sample_stream(shards, tokenizer, spec, eval_data)
    samples = list(itertools.islice(stream, eval_cfg.max_samples))  # the stream goes on from here
    if not samples:
        raise ValueError(f"validation shards {shards}: no readable sample")
    was_training = model.training
    model.eval()
    times = timings if timings is not None else {}
    try:
        start = time.perf_counter()
        batches = collate_eval_batches(samples, tokenizer, eval_data, masking, EVAL_SEED)
        metrics = masked_modelling_metrics(model, batches, device, objectives or ObjectiveWeights(), show_progress)
        times["masked_modelling_s"] = time.perf_counter() - start
        start = time.perf_counter()
        read = tqdm(itertools.chain(samples, stream), desc="eval gallery", unit="sample", disable=not show_progress, leave=False)
        gallery = retrieval_gallery(read, tokenizer, data.max_text_length, eval_cfg.retrieval_candidates)
        times["gallery_read_s"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics |= zero_shot_retrieval(model, gallery, tokenizer.pad_token_id, device, eval_cfg.batch_size, show_progress)
        times["retrieval_s"], times["retrieval_pairs"] = time.perf_counter() - start, gallery.num_pairs
    finally:
        model.train(was_training)
    return metrics


def metrics_table(metrics: dict) -> list[str]:
    """The metrics beside their chance levels, one line each (percent, but the MRFR loss)."""
    rows = [
        ("ITM accuracy", metrics.get("itm_acc"), metrics.get("itm_chance")),
        ("MLM accuracy", metrics.get("mlm_acc"), None),
        ("MOC accuracy", metrics.get("moc_acc"), None),
        ("MRFR loss", metrics.get("mrfr_loss"), None),
    ]
    for k in RECALL_AT:
        rows.append((f"image->text R@{k}", metrics.get(f"i2t_r{k}"), metrics.get(f"i2t_r{k}_chance")))
        rows.append((f"text->image R@{k}", metrics.get(f"t2i_r{k}"), metrics.get(f"t2i_r{k}_chance")))
    lines = [f"{'metric':<20}{'value':>10}{'chance':>10}"]
    for name, value, chance in rows:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        lines.append(f"{name:<20}{value:>10.2f}{'' if chance is None else f'{chance:>10.2f}'}")
    return lines
