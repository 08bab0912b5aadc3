"""``python -m preprocess from-captions``: a Karpathy-split caption file and its images -> raw shards.

``python -m preprocess from-captions --annotations dataset_flickr30k.json --images DIR --split test
--out DIR`` writes the images of one split of a Karpathy-split annotation file (Flickr30k, Flickr8k
and COCO layouts) as raw shards in the img2dataset layout, each image once with all of its
captions: ``KEY.jpg|png|webp`` (the file's bytes, unchanged), ``KEY.txt`` (the first caption) and
``KEY.json`` with ``image_id`` (Karpathy's ``imgid``) and ``captions`` (all of them), the
representation of several captions per image that extraction passes through and retrieval
evaluation groups by (``preprocess.feature_format``, docs/preprocess.md).

The annotation file is ``{"dataset": "coco"|"flickr30k"|..., "images": [{"filename", "filepath"
(COCO: e.g. "val2014"), "split": "train"|"val"|"test"|"restval", "sentences": [{"raw", "tokens"},
...], "sentids", "imgid", "cocoid" (COCO)}, ...]}``; an image is read from ``IMAGES/filepath/filename``
(``IMAGES/filename`` without ``filepath``). ``restval`` (COCO's images outside the 5K val and test
sets) belongs to no split unless ``--include-restval`` puts it into ``--split train``, as is usual
for training on COCO. A malformed file is one error line naming the entry; an image that is
missing, or not JPEG, PNG or WebP, or has no caption is recorded in ``OUT/skipped.parquet`` (the
extraction's columns) and the rest are written. Shards are written atomically; a rerun with the
same arguments keeps the shards in place and writes the missing ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from preprocess import atomic
from preprocess.captions import CAPTIONS_FIELD, IMAGE_ID_FIELD
from preprocess.synth import image_extension, prepare_shard_dir, shard_name, write_shard

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "restval")
CONFIG_FILE = "from_captions.yaml"  # the resolved arguments, so a rerun resumes only the same job
SUMMARY_FILE = "summary.json"


@dataclass
class CaptionsConfig:
    annotations: str  # the Karpathy-split JSON
    images: str  # the image folder (COCO: holding train2014/, val2014/)
    split: str
    include_restval: bool = False  # restval images count as train
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.split not in SPLITS[:3]:
            raise ValueError(f"--split must be one of {', '.join(SPLITS[:3])}, got {self.split!r}")
        if self.include_restval and self.split != "train":
            raise ValueError(f"--include-restval adds restval images to --split train, not to {self.split}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not Path(self.annotations).is_file():
            raise FileNotFoundError(f"--annotations {self.annotations}: no such file")
        if not Path(self.images).is_dir():
            raise FileNotFoundError(f"--images {self.images}: no such directory")

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "restval") if self.include_restval else (self.split,)


@dataclass
class PlannedImage:
    key: str
    path: Path
    captions: list[str]
    meta: dict


def read_annotations(path: str) -> tuple[str, list[dict]]:
    """``(dataset, images)`` of a Karpathy-split file; ``ValueError`` naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list (a Karpathy-split file)")
    return str(data.get("dataset", "")), data["images"]


def _entry_fields(path: str, position: int, entry) -> tuple[int, str, str, list[str]]:
    """``(imgid, split, relative image path, captions)`` of ``images[position]``; ``ValueError`` naming it."""
    where = f"{path}: images[{position}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    for name, kind in (("filename", str), ("split", str), ("sentences", list), ("imgid", int)):
        if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
            raise ValueError(f"{where}: {name!r} is missing or not a {kind.__name__}")
    if entry["split"] not in SPLITS:
        raise ValueError(f"{where}: split {entry['split']!r} is not one of {', '.join(SPLITS)}")
    captions = []
    for number, sentence in enumerate(entry["sentences"]):
        if not isinstance(sentence, dict):
            raise ValueError(f"{where}: sentences[{number}] is not an object")
        text = sentence.get("raw")
        if text is None and isinstance(sentence.get("tokens"), list):
            text = " ".join(str(t) for t in sentence["tokens"])
        if not isinstance(text, str):
            raise ValueError(f"{where}: sentences[{number}] has no 'raw' string and no 'tokens' list")
        if text.strip():
            captions.append(text.strip())
    relative = str(Path(entry.get("filepath") or "") / entry["filename"])
    return entry["imgid"], entry["split"], relative, captions


def plan(config: CaptionsConfig) -> tuple[str, list[PlannedImage], list[dict]]:
    """``(dataset, images to write, skipped rows)`` of the split, in file order; reads only each
    image's first bytes (its format)."""
    dataset, entries = read_annotations(config.annotations)
    images_dir = Path(config.images)
    planned: list[PlannedImage] = []
    skipped: list[dict] = []
    seen: dict[int, int] = {}
    for position, entry in enumerate(entries):
        imgid, split, relative, captions = _entry_fields(config.annotations, position, entry)
        if imgid in seen:
            raise ValueError(f"{config.annotations}: images[{position}]: imgid {imgid} already used by images[{seen[imgid]}]")
        seen[imgid] = position
        if split not in config.splits:
            continue
        key, path = f"{imgid:09d}", images_dir / relative

        def skip(reason: str, detail: str) -> None:
            skipped.append({"key": key, "source_shard": config.annotations, "source_index": position,
                            "reason": reason, "detail": detail})

        if not captions:
            skip("missing_caption", "no sentence with text")
            continue
        try:
            with open(path, "rb") as f:
                image_extension(f.read(12))
        except FileNotFoundError:
            skip("missing_image", f"{path}: no such file")
            continue
        except (OSError, ValueError) as err:
            skip("unsupported_image", f"{path}: {err}")
            continue
        meta = {
            IMAGE_ID_FIELD: imgid, CAPTIONS_FIELD: captions, "filename": entry["filename"], "split": split,
            "dataset": dataset,
        }
        meta |= {name: entry[name] for name in ("filepath", "sentids", "cocoid") if name in entry}
        planned.append(PlannedImage(key, path, captions, meta))
    return dataset, planned, skipped


def write(config: CaptionsConfig, out: Path, planned: list[PlannedImage], skipped: list[dict], dataset: str) -> dict:
    """The pending shards, ``skipped.parquet`` and ``summary.json`` (the summary is returned)."""
    import pyarrow as pa

    from preprocess.feature_format import SKIPPED_FILE
    from preprocess.shard_output import SKIPPED_SCHEMA

    chunks = [planned[i : i + config.samples_per_shard] for i in range(0, len(planned), config.samples_per_shard)]
    pending = [index for index in range(len(chunks)) if not (out / shard_name(index)).exists()]
    if len(pending) < len(chunks):
        log.info("%s: %d of %d shards already written, resuming", out, len(chunks) - len(pending), len(chunks))
    with tqdm(total=sum(len(chunks[i]) for i in pending), desc="from-captions", unit="img") as bar:
        for index in pending:
            def samples(chunk=chunks[index]):
                for image in chunk:
                    yield image.key, image.path.read_bytes(), image.captions[0], image.meta
                    bar.update(1)

            write_shard(out / shard_name(index), samples())
    atomic.write_table(out / SKIPPED_FILE, pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA))
    summary = {
        "dataset": dataset, "split": config.split, "include_restval": config.include_restval,
        "images": len(planned), "captions": sum(len(p.captions) for p in planned), "shards": len(chunks),
        "skipped": len(skipped), "skipped_by_reason": dict(sorted(Counter(r["reason"] for r in skipped).items())),
    }
    atomic.write_json(out / SUMMARY_FILE, summary)
    return summary


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise _UsageError(message)


def cli(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _Parser(prog="python -m preprocess from-captions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json)")
    parser.add_argument("--images", required=True, help="image folder (COCO: the folder holding train2014/ and val2014/)")
    parser.add_argument("--split", required=True, help="train, val or test")
    parser.add_argument("--include-restval", action="store_true", help="with --split train: add COCO's restval images")
    parser.add_argument("--out", required=True, type=Path, help="output directory for NNNNN.tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    try:
        args = parser.parse_args(argv)
        config = CaptionsConfig(args.annotations, args.images, args.split, args.include_restval, args.samples_per_shard)
        dataset, planned, skipped = plan(config)
        if not planned:
            raise ValueError(f"{config.annotations}: no image of split {config.split} could be written "
                             f"({len(skipped)} skipped, the first: {skipped[0]['detail'] if skipped else 'none in the file'})")
        prepare_shard_dir(args.out, config, CONFIG_FILE, "from-captions")
    except (_UsageError, ValueError, OSError) as err:
        print(f"from-captions: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    if config.include_restval:
        log.info("restval images count as train (--include-restval)")
    summary = write(config, args.out, planned, skipped, dataset)
    log.info(
        "%s: %d images with %d captions in %d shards (%s, split %s); %d skipped %s", args.out, summary["images"],
        summary["captions"], summary["shards"], dataset or "dataset not named", config.split, summary["skipped"],
        summary["skipped_by_reason"],
    )
    return 0
