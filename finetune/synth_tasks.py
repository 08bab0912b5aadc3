"""Tiny synthetic versions of every fine-tuning task, built on the synthetic scenes.

``python -m finetune.synth_tasks --task TASK --out DIR --num-samples N --seed S`` writes raw
shards in the img2dataset layout (``DIR/00000.tar`` with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``),
ready for ``python -m preprocess extract`` in given-boxes mode (the JSON carries the scene's
boxes and labels), plus ``DIR/task.json`` with the label names, the chance level and the
unimodal ceilings measured on the generated samples.

Every task is built so that text alone and image alone fall short:

- ``classification`` (5 classes, Food101-like): the caption asks about one colour ("the red
  one"); the label is the shape of the object of that colour. The asked colour is unique in
  the scene, and the uniquely coloured objects have at least two different shapes. Text alone knows the colour, not the shape; image alone
  sees the shapes, not which one is asked.
- ``multilabel`` (5 labels, MM-IMDB-like): the caption lists 1-3 colours, at least one in the
  image; the labels (``target_labels``; the scene's own ``labels`` are the per-box classes the
  extractor reads) are the shapes of the objects with a listed colour.
- ``sentiment`` (2 classes, MSA-like): the caption states an opinion about a colour-shape
  object. A quarter of the captions say it plainly ("i hate the red circle"): the text decides.
  The rest are enthusiastic in a way only the image resolves ("what a lovely red circle"):
  sincere (positive) when the image shows that object, sarcastic (negative) when it does not,
  both equally likely. Text alone knows the plain quarter and guesses the rest; the image alone
  does not know which object is talked about.
- ``ner`` (BIO tags ``O``/``B-OBJ``/``I-OBJ`` over words): the caption mentions 2-3 colour-shape
  phrases; a phrase is an entity only when that object is in the image.
- ``retrieval``: scene descriptions; ``--captions-per-image`` captions per image (5 for a test
  set like COCO's), one sample per (image, caption) with ``image_id`` and ``caption_id``.

One more is the other way round, for CMG's cross-modal generalisation protocol (a classifier
trained on one modality, applied to the other; ``fusion.name: cross_modal``):

- ``shape`` (5 classes, fine-tuned as ``classification``): every object in the scene has the
  same shape, the caption describes the scene as pretraining's captions do, and the label is that
  shape. Text alone and image alone each decide it.

Everything is a pure function of (task, seed, index); a killed run resumes by skipping the
shards already written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from finetune.config import TASKS

SYNTH_TASKS = (*TASKS, "shape")  # the fine-tuning tasks, and CMG's protocol's task (a classification)
from preprocess import atomic
from preprocess.synth import encode_image, scene_metadata, shard_name, write_shard
from preprocess.synth_scenes import (
    COLOUR_WORDS,
    COLOURS,
    SHAPE_WORDS,
    SIZE_WORDS,
    SYNTH_CLASS_NAMES,
    TRAIN_PAIRS,
    Scene,
    describe,
    render,
    sample_scene,
)

log = logging.getLogger(__name__)

TASK_FILE = "task.json"
NER_TAGS = ("O", "B-OBJ", "I-OBJ")
SENTIMENT_LABELS = ("negative", "positive")
_POSITIVE = ("i love the {}", "the {} looks great", "i really like the {}")
_NEGATIVE = ("i hate the {}", "the {} looks awful", "i really dislike the {}")
# Praise that is sincere or sarcastic depending on the image. (A masked caption's length may tell
# the kinds apart; that does not help image only: within each kind the label is a coin flip.)
_IMAGE_DECIDES = ("what a lovely {}", "oh great the {}", "just what i wanted a {}", "so glad to see the {}")
SENTIMENT_CUES = ("negative", "positive", "image")  # who decides: the words (plainly), or the image
_PLAIN_FRACTION = 0.25  # below the ~2/3 at which text alone would reach 70 %
_ASK = ("the {} one", "which shape is {}", "look at the {} object", "the {} thing in the picture", "what is the {} shape")
_LIST_INTRO = ("find the shapes coloured", "objects in", "show me everything", "anything")
_NER_INTRO = ("i see", "look at", "there may be", "someone mentioned", "find")
_NER_JOIN = ("and", "or", "next to", "beside")
_SCENE_ATTEMPTS = 100


@dataclass
class TaskSample:
    key: str
    image: bytes
    caption: str
    meta: dict


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _scene(rng: np.random.Generator, image_size: tuple[int, int], accept) -> Scene:
    """The first sampled scene ``accept`` approves (deterministic for a given generator)."""
    for _ in range(_SCENE_ATTEMPTS):
        scene = sample_scene(rng, "train", image_size)
        if accept(scene):
            return scene
    raise RuntimeError(f"no acceptable scene in {_SCENE_ATTEMPTS} draws; the scene generator changed?")


def _unique_colours(scene: Scene) -> list[str]:
    counts = Counter(o.colour for o in scene.objects)
    return sorted(c for c, n in counts.items() if n == 1)


def _candidate_shapes(scene: Scene) -> set[str]:
    """Shapes of the uniquely coloured objects: what a classification question can ask about."""
    unique = _unique_colours(scene)
    return {o.shape for o in scene.objects if o.colour in unique}


def _phrase_words(colour: str, shape: str, size: str | None, rng: np.random.Generator) -> list[str]:
    words = ([_pick(SIZE_WORDS[size], rng)] if size else []) + [_pick(COLOUR_WORDS[colour], rng)]
    return words + _pick(SHAPE_WORDS[shape], rng).split()


def _absent_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    candidates = [p for p in TRAIN_PAIRS if p not in present]
    return candidates[int(rng.integers(len(candidates)))]


def make_task_sample(task: str, seed: int, index: int, image_size=(96, 128), captions_per_image: int = 1) -> list[TaskSample]:
    """Sample ``index`` of a task: one ``TaskSample``, or one per caption for retrieval."""
    rng = np.random.default_rng([seed, SYNTH_TASKS.index(task), index])
    if task == "retrieval":
        scene = sample_scene(rng, "train", image_size)
        image = encode_image(render(scene), "jpg")
        meta = scene_metadata(scene, "train")
        return [
            TaskSample(f"{index:07d}_{c}", image, describe(scene, rng), meta | {"image_id": index, "caption_id": index * captions_per_image + c})
            for c in range(captions_per_image)
        ]
    if task == "classification":
        scene = _scene(rng, image_size, lambda s: len(_candidate_shapes(s)) >= 2)
        colour = _pick(_unique_colours(scene), rng)
        target = next(o for o in scene.objects if o.colour == colour)
        caption = _pick(_ASK, rng).format(_pick(COLOUR_WORDS[colour], rng))
        fields = {"label": SYNTH_CLASS_NAMES.index(target.shape), "asked_colour": colour}
    elif task == "shape":
        scene = _scene(rng, image_size, lambda s: len({o.shape for o in s.objects}) == 1)
        caption = describe(scene, rng)
        fields = {"label": SYNTH_CLASS_NAMES.index(scene.objects[0].shape)}
    elif task == "multilabel":
        scene = _scene(rng, image_size, lambda s: len(s.objects) >= 2)
        present = sorted({o.colour for o in scene.objects})
        absent = [c for c in COLOURS if c not in present]
        listed = [_pick(present, rng)]
        others = [c for c in present + absent if c != listed[0]]
        extra = int(rng.integers(0, 3))
        listed += [others[int(i)] for i in rng.choice(len(others), size=extra, replace=False)]
        listed = [listed[int(i)] for i in rng.permutation(len(listed))]
        labels = sorted({SYNTH_CLASS_NAMES.index(o.shape) for o in scene.objects if o.colour in listed})
        colour_words = [_pick(COLOUR_WORDS[c], rng) for c in listed]
        listing = colour_words[0] if len(listed) == 1 else ", ".join(colour_words[:-1]) + " or " + colour_words[-1]
        caption = f"{_pick(_LIST_INTRO, rng)} {listing}"
        fields = {"target_labels": labels, "listed_colours": listed}
    elif task == "sentiment":
        scene = sample_scene(rng, "train", image_size)
        present = bool(rng.integers(2))
        if present:
            obj = _pick(scene.objects, rng)
            colour, shape = obj.colour, obj.shape
        else:
            colour, shape = _absent_pair(scene, rng)
        if rng.uniform() < _PLAIN_FRACTION:
            label = int(rng.integers(2))
            cue, template = SENTIMENT_CUES[label], _pick(_POSITIVE if label else _NEGATIVE, rng)
        else:  # sincere if the praised object is there, sarcastic if not
            label, cue, template = int(present), "image", _pick(_IMAGE_DECIDES, rng)
        caption = template.format(" ".join(_phrase_words(colour, shape, None, rng)))
        fields = {"label": label, "cue": cue, "object_present": present}
    elif task == "ner":
        scene = sample_scene(rng, "train", image_size)
        count = int(rng.integers(2, 4))
        unused = list(scene.objects)
        words, phrases = list(_pick(_NER_INTRO, rng).split()), []
        tags = ["O"] * len(words)
        for p in range(count):
            if p:
                join = _pick(_NER_JOIN, rng).split()
                words += join
                tags += ["O"] * len(join)
            if unused and rng.uniform() < 0.5:
                obj = unused.pop(int(rng.integers(len(unused))))
                colour, shape, size, present = obj.colour, obj.shape, obj.size, True
            else:
                (colour, shape), size, present = _absent_pair(scene, rng), _pick(tuple(SIZE_WORDS), rng), False
            phrase = _phrase_words(colour, shape, size if rng.uniform() < 0.5 else None, rng)
            words += ["the"]
            tags += ["O"]
            words += phrase
            tags += (["B-OBJ"] + ["I-OBJ"] * (len(phrase) - 1)) if present else ["O"] * len(phrase)
            phrases.append({"colour": colour, "shape": shape, "present": present})
        caption = " ".join(words)
        fields = {"words": words, "tags": tags, "phrases": phrases}
    else:
        raise ValueError(f"task must be one of {SYNTH_TASKS}, got {task!r}")
    meta = scene_metadata(scene, "train") | fields
    return [TaskSample(f"{index:09d}", encode_image(render(scene), "jpg"), caption, meta)]


# ---------------------------------------------------------------- chance and unimodal ceilings


def _best_guess(metas: list[dict], known) -> int:
    """Samples right when predicting, for each value of ``known(meta)``, that value's majority label."""
    by_value: dict = {}
    for m in metas:
        by_value.setdefault(known(m), Counter())[m["label"]] += 1
    return sum(max(c.values()) for c in by_value.values())


def task_statistics(task: str, metas: list[dict]) -> dict:
    """Chance level and what the best (or an obvious) single-modality strategy reaches on ``metas``.

    Computed from the generated samples' metadata, so the figures describe this very data set.
    """
    n = len(metas)
    if task == "classification":
        labels = [m["label"] for m in metas]
        # image only: the asked object is one of the uniquely coloured objects, equally likely
        image_only = 0.0
        for m in metas:
            colours = Counter(o["colour"] for o in m["objects"])
            candidates = Counter(SYNTH_CLASS_NAMES.index(o["shape"]) for o in m["objects"] if colours[o["colour"]] == 1)
            image_only += max(candidates.values()) / sum(candidates.values())
        return {
            "metric": "accuracy",
            "chance": 100.0 * max(Counter(labels).values()) / n,
            "text_only_ceiling": 100.0 * _best_guess(metas, lambda m: m["asked_colour"]) / n,
            "image_only_ceiling": 100.0 * image_only / n,
        }
    if task == "shape":  # the caption names the shape and the image shows it: each modality alone decides
        labels = [m["label"] for m in metas]
        return {"metric": "accuracy", "chance": 100.0 * max(Counter(labels).values()) / n,
                "text_only_ceiling": 100.0, "image_only_ceiling": 100.0}
    if task == "multilabel":
        # obvious strategies scored with samples-F1: text only predicts every shape (it knows no
        # shape); image only predicts every shape in the image (it cannot tell which are asked)
        text_only = image_only = 0.0
        for m in metas:
            k = len(m["target_labels"])
            shown = len({o["shape"] for o in m["objects"]})
            text_only += 2 * k / (k + len(SYNTH_CLASS_NAMES))
            image_only += 2 * k / (k + shown)
        return {"metric": "samples_f1", "text_only_strategy": "predict all labels", "text_only_ceiling": 100.0 * text_only / n,
                "image_only_strategy": "predict the shapes in the image", "image_only_ceiling": 100.0 * image_only / n}
    if task == "sentiment":
        labels = [m["label"] for m in metas]
        # text only knows the cue (plain positive, plain negative, or praise the image decides);
        # image only knows the scene, and whether the praised object is in it does not depend on
        # the scene (drawn first, presence a coin flip), so its best guess per object count is
        # chance up to sampling noise
        return {
            "metric": "accuracy",
            "chance": 100.0 * max(Counter(labels).values()) / n,
            "text_only_ceiling": 100.0 * _best_guess(metas, lambda m: m["cue"]) / n,
            "image_only_ceiling": 100.0 * _best_guess(metas, lambda m: len(m["objects"])) / n,
        }
    if task == "ner":
        # text only, best strategy: tag every phrase (entities are present phrases, unknowable from text)
        phrases = sum(len(m["phrases"]) for m in metas)
        entities = sum(p["present"] for m in metas for p in m["phrases"])
        precision = entities / max(phrases, 1)
        return {"metric": "entity_f1", "text_only_strategy": "tag every colour-shape phrase",
                "text_only_ceiling": 100.0 * 2 * precision / (1 + precision) if precision else 0.0,
                "image_only_ceiling": 0.0, "image_only_note": "without words no span can be placed"}
    if task == "retrieval":
        images = len({m["image_id"] for m in metas})
        return {"metric": "R@1", "chance": 100.0 / max(images, 1), "text_only_ceiling": 100.0 / max(images, 1),
                "image_only_ceiling": 100.0 / max(images, 1)}
    raise ValueError(f"task must be one of {SYNTH_TASKS}, got {task!r}")


def label_names(task: str) -> list[str]:
    return {
        "classification": list(SYNTH_CLASS_NAMES),
        "shape": list(SYNTH_CLASS_NAMES),
        "multilabel": list(SYNTH_CLASS_NAMES),
        "sentiment": list(SENTIMENT_LABELS),
        "ner": list(NER_TAGS),
        "retrieval": [],
    }[task]


# ---------------------------------------------------------------- command line


@dataclass
class SynthTaskConfig:
    task: str
    num_samples: int
    seed: int = 0
    samples_per_shard: int = 500
    image_size: tuple[int, int] = (96, 128)
    captions_per_image: int = 1

    def __post_init__(self) -> None:
        if self.task not in SYNTH_TASKS:
            raise ValueError(f"--task must be one of {', '.join(SYNTH_TASKS)}, got {self.task!r}")
        if self.num_samples < 1 or self.samples_per_shard < 1 or self.captions_per_image < 1:
            raise ValueError("--num-samples, --samples-per-shard and --captions-per-image must be >= 1")
        if self.captions_per_image > 1 and self.task != "retrieval":
            raise ValueError("--captions-per-image applies to --task retrieval only")
        low, high = self.image_size
        if not 48 <= low <= high:
            raise ValueError(f"--image-size needs 48 <= MIN <= MAX, got {low} {high}")


def write_task_shards(config: SynthTaskConfig, out: Path, progress: bool = True) -> Path:
    """Write the shards (skipping those already there) and ``task.json``; returns ``task.json``'s path."""
    out.mkdir(parents=True, exist_ok=True)
    task_file = out / TASK_FILE
    if task_file.exists():
        previous = json.loads(task_file.read_text(encoding="utf-8")).get("config")
        if previous != json.loads(json.dumps(asdict(config))):
            raise ValueError(f"--out {out} holds a different synthetic task ({task_file}); use another --out")
    num_shards = -(-config.num_samples // config.samples_per_shard)
    metas: list[dict] = []
    bar = tqdm(total=config.num_samples, desc=f"synth {config.task}", unit="img", disable=not progress)
    for shard in range(num_shards):
        first = shard * config.samples_per_shard
        indices = range(first, min(first + config.samples_per_shard, config.num_samples))
        samples = [s for i in indices for s in make_task_sample(config.task, config.seed, i, config.image_size, config.captions_per_image)]
        metas += [s.meta for s in samples]
        path = out / shard_name(shard)
        if not path.exists():  # regenerating the metadata is cheap; encoding is not repeated on disk
            write_shard(path, ((s.key, s.image, s.caption, s.meta) for s in samples))
        bar.update(len(indices))
    bar.close()
    info = {"task": config.task, "label_names": label_names(config.task), "num_samples": len(metas),
            "statistics": task_statistics(config.task, metas), "config": asdict(config)}
    atomic.write_json(task_file, info)
    return task_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune.synth_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=SYNTH_TASKS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-samples", required=True, type=int, help="images (retrieval: each with --captions-per-image samples)")
    parser.add_argument("--seed", type=int, default=0, help="use different seeds for train and test sets")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--image-size", nargs=2, type=int, default=[96, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--captions-per-image", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        config = SynthTaskConfig(
            task=args.task, num_samples=args.num_samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
            image_size=tuple(args.image_size), captions_per_image=args.captions_per_image,
        )
        task_file = write_task_shards(config, args.out)
    except (ValueError, OSError) as err:
        print(f"synth_tasks: error: {err}", file=sys.stderr)
        return 2
    stats = json.loads(task_file.read_text(encoding="utf-8"))["statistics"]
    log.info("%s: %s", task_file, json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
