"""The synthetic tasks: labels follow their rules, both modalities are needed, shards are deterministic and resumable."""

import hashlib
import json
from collections import Counter

import pytest
import webdataset as wds

from finetune.metrics import entity_spans
from finetune.synth_tasks import TASK_FILE, SynthTaskConfig, make_task_sample, write_task_shards
from preprocess.synth_scenes import COLOUR_WORDS, SHAPE_WORDS, SYNTH_CLASS_NAMES


def _samples(task, n=60):
    return [s for i in range(n) for s in make_task_sample(task, 7, i, (48, 64))]


def test_classification_label_is_the_shape_of_the_named_colour():
    for s in _samples("classification"):
        meta = s.meta
        named = [c for c, words in COLOUR_WORDS.items() if any(w in s.caption.split() for w in words)]
        assert named == [meta["asked_colour"]]
        owners = [o for o in meta["objects"] if o["colour"] == meta["asked_colour"]]
        assert len(owners) == 1 and SYNTH_CLASS_NAMES.index(owners[0]["shape"]) == meta["label"]
        assert len(meta["boxes"]) == len(meta["labels"]) == len(meta["objects"])  # extractor's fields intact


def test_multilabel_targets_are_shapes_of_listed_colours():
    for s in _samples("multilabel"):
        meta = s.meta
        expected = {SYNTH_CLASS_NAMES.index(o["shape"]) for o in meta["objects"] if o["colour"] in meta["listed_colours"]}
        assert set(meta["target_labels"]) == expected and expected


def test_sentiment_plain_words_decide_else_the_image_does():
    samples = _samples("sentiment", 200)
    for s in samples:
        m = s.meta
        words = s.caption.split()
        [colour] = [c for c, names in COLOUR_WORDS.items() if any(w in words for w in names)]
        [shape] = [h for h, names in SHAPE_WORDS.items() if any(n in s.caption for n in names)]
        assert m["object_present"] == ((colour, shape) in {(o["colour"], o["shape"]) for o in m["objects"]})
        # plain words decide; otherwise the image: sincere praise when the named object is shown, sarcasm when not
        assert m["label"] == ({"negative": 0, "positive": 1}[m["cue"]] if m["cue"] != "image" else int(m["object_present"]))
    cues = Counter(s.meta["cue"] for s in samples)
    assert set(cues) == {"negative", "positive", "image"} and cues["image"] > len(samples) / 2
    # where the image decides, both answers occur, so the words alone cannot settle those captions
    assert {s.meta["object_present"] for s in samples if s.meta["cue"] == "image"} == {True, False}


def test_ner_entities_are_exactly_the_present_phrases():
    for s in _samples("ner"):
        m = s.meta
        assert s.caption.split() == m["words"] and len(m["words"]) == len(m["tags"])
        present = {(o["colour"], o["shape"]) for o in m["objects"]}
        assert sum(p["present"] for p in m["phrases"]) == len(entity_spans(m["tags"]))
        for p in m["phrases"]:
            assert p["present"] == ((p["colour"], p["shape"]) in present)


def test_statistics_show_both_modalities_fall_short(tmp_path):
    for task in ("classification", "sentiment", "ner"):
        write_task_shards(SynthTaskConfig(task, 200, seed=0, image_size=(48, 64)), tmp_path / task, progress=False)
        stats = json.loads((tmp_path / task / TASK_FILE).read_text())["statistics"]
        assert stats["text_only_ceiling"] < 70 and stats["image_only_ceiling"] < 70, (task, stats)
        if task == "sentiment":  # text only gets the plain quarter right and guesses the rest (62.5 %)
            assert 55 < stats["text_only_ceiling"] < 70 and stats["image_only_ceiling"] < 58, stats


def test_shards_are_deterministic_and_resume(tmp_path):
    config = SynthTaskConfig("retrieval", 12, seed=3, samples_per_shard=5, image_size=(48, 64), captions_per_image=2)
    write_task_shards(config, tmp_path / "a", progress=False)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "a").glob("*.tar"))}
    assert len(digest) == 3
    (tmp_path / "a" / "00001.tar").unlink()  # a killed run lost a shard
    write_task_shards(config, tmp_path / "a", progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "a").glob("*.tar"))} == digest
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "a" / "00000.tar"), shardshuffle=False)]
    assert len(keys) == 10  # 5 images x 2 captions
    with pytest.raises(ValueError, match="different synthetic task"):
        write_task_shards(SynthTaskConfig("retrieval", 13, seed=3, samples_per_shard=5), tmp_path / "a", progress=False)
