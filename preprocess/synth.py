"""``python -m preprocess synth``: raw image-caption shards of synthetic scenes.

``python -m preprocess synth --out DIR --num-samples N --seed S`` writes raw shards in the
img2dataset layout (``DIR/00000.tar`` holding ``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``)
so the whole pipeline can run end to end on a laptop without downloading a dataset. The scenes
(``preprocess.synth_scenes``) name every object's colour and shape in the caption; the JSON
carries exact boxes and labels indexing ``SYNTH_CLASS_NAMES``, so the extractor's given-boxes
mode can use them as MOC targets. A fixed set of (colour, shape) pairs (``HELDOUT_PAIRS``)
never occurs in ``--split train`` and every ``--split heldout`` scene holds at least one.

Every sample is a pure function of (seed, split, index): the same seed gives byte-identical
shards, and a killed run resumes by skipping the shards already in place.

``--caption-mismatch P`` and ``--caption-corrupt Q`` make a web-like noisy set: a share P of the
captions is another scene's, a share Q is this scene's with wrong colours and dropped words. The
noise is drawn from a random stream of its own, so the images and clean captions are the same
as without it, and with both at 0 the shards are exactly those of a run without the flags.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from preprocess import atomic
from preprocess.config import ConfigError, dump_yaml, from_dict

# The scene library's public names, importable from here as well (finetune uses both modules).
from preprocess.synth_scenes import (
    COLOUR_WORDS,
    COLOURS,
    HELDOUT_PAIRS,
    SPLITS,
    SYNTH_CLASS_NAMES,
    TRAIN_PAIRS,
    Background,
    Scene,
    SceneObject,
    describe,
    render,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "HELDOUT_PAIRS",
    "IMAGE_FORMATS",
    "SPLITS",
    "SYNTH_CLASS_NAMES",
    "TRAIN_PAIRS",
    "Background",
    "Scene",
    "SceneObject",
    "SynthConfig",
    "cli",
    "corrupt_caption",
    "describe",
    "encode_image",
    "image_extension",
    "make_sample",
    "prepare_shard_dir",
    "render",
    "sample_scene",
    "scene_metadata",
    "shard_name",
    "write_raw_shards",
    "write_shard",
]

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("jpg", "png", "rgba", "gray", "webp")  # rgba: PNG with alpha; gray: greyscale JPEG
SHARD_CONFIG_FILE = "synth.yaml"  # the resolved arguments, so a rerun resumes only the same job

# ---------------------------------------------------------------- samples and shards


def scene_metadata(scene: Scene, split: str) -> dict:
    """The sample's JSON: image size, boxes in original pixels, labels indexing SYNTH_CLASS_NAMES."""
    return {
        "width": scene.width,
        "height": scene.height,
        "boxes": [list(obj.box) for obj in scene.objects],
        "labels": [obj.label for obj in scene.objects],
        "label_names": [obj.shape for obj in scene.objects],
        "objects": [{"shape": obj.shape, "colour": obj.colour, "size": obj.size} for obj in scene.objects],
        "background": scene.background.kind,
        "split": split,
    }


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Encode in one of IMAGE_FORMATS; deterministic for a given Pillow build."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.convert("RGB").save(buffer, format="JPEG", quality=92)
    elif image_format == "gray":
        image.convert("L").save(buffer, format="JPEG", quality=92)
    elif image_format == "png":
        image.convert("RGB").save(buffer, format="PNG")
    elif image_format == "rgba":
        # A real alpha channel (partly transparent): the extractor must flatten it to RGB.
        rgba = image.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buffer, format="PNG")
    elif image_format == "webp":
        image.convert("RGB").save(buffer, format="WEBP", quality=90, method=4)
    else:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def image_extension(data: bytes) -> str:
    """The webdataset member extension for encoded image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("image bytes are not JPEG, PNG or WebP")


def make_sample(
    seed: int, split: str, index: int, image_size=(96, 192), formats=("jpg",),
    caption_mismatch: float = 0.0, caption_corrupt: float = 0.0,
):
    """Sample ``index`` of a dataset: ``(key, encoded image bytes, caption, metadata)``.

    A pure function of its arguments, so any shard can be regenerated on its own. With caption
    noise (``caption_mismatch`` + ``caption_corrupt`` > 0) the JSON says which caption is noisy
    (``caption_noise``: ``mismatched``, ``corrupted`` or null); the model never reads it.
    """
    rng, scene, caption = _scene_and_caption(seed, split, index, image_size)
    image_format = formats[int(rng.integers(len(formats)))]
    meta = scene_metadata(scene, split) | {"image_format": image_format}
    if caption_mismatch or caption_corrupt:
        caption, meta["caption_noise"] = _noisy_caption(
            caption, seed, split, index, image_size, caption_mismatch, caption_corrupt
        )
    return f"{index:09d}", encode_image(render(scene), image_format), caption, meta


def _scene_and_caption(seed: int, split: str, index: int, image_size) -> tuple[np.random.Generator, Scene, str]:
    """Sample ``index``'s scene and clean caption, and its random stream (which goes on to pick the format)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, split, image_size)
    return rng, scene, describe(scene, rng)


# Tags the caption-noise stream apart from the sample's own [seed, split, index] stream, so
# drawing noise never shifts a draw of the scene, its caption or its format.
_NOISE_STREAM = 0x6E6F6973


def _noisy_caption(
    caption: str, seed: int, split: str, index: int, image_size, mismatch: float, corrupt: float
) -> tuple[str, str | None]:
    """``(caption, kind)``: another scene's caption with probability ``mismatch``, this one
    corrupted with probability ``corrupt``, else unchanged (kind None)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index, _NOISE_STREAM])
    draw = rng.uniform()
    if draw < mismatch:
        # Another sample of the same generator (often one that is not in this set, as web alt
        # text often describes some other picture).
        other = int(rng.integers(2**31 - 1))
        other += other >= index  # never this sample itself
        return _scene_and_caption(seed, split, other, image_size)[2], "mismatched"
    if draw < mismatch + corrupt:
        return corrupt_caption(caption, rng), "corrupted"
    return caption, None


_COLOUR_WORDS = {word: colour for colour, words in COLOUR_WORDS.items() for word in words}


def corrupt_caption(caption: str, rng: np.random.Generator, drop: float = 0.2) -> str:
    """The caption with every colour word replaced by another colour and a share ``drop`` of the
    other words dropped: it still looks like a caption of the scene but misdescribes it."""
    words = []
    for word in caption.split(" "):
        bare = word.rstrip(",;:")
        if bare in _COLOUR_WORDS:
            wrong = [c for c in COLOURS if c != _COLOUR_WORDS[bare]]
            words.append(wrong[int(rng.integers(len(wrong)))] + word[len(bare):])
        elif rng.uniform() >= drop:
            words.append(word)
    return " ".join(words)


def write_shard(path: str | Path, samples: Iterable[tuple]) -> int:
    """Write ``(key, image, caption, meta)`` samples to one tar atomically; returns the sample count.

    ``image`` is a PIL image (stored as JPEG) or encoded JPEG/PNG/WebP bytes. Tar member times
    are fixed so the same samples give the same bytes.
    """
    import webdataset as wds  # imports torch: only once there is something to write, after the arguments are checked

    count = 0

    def write(stream) -> None:
        nonlocal count
        with wds.TarWriter(stream, mtime=0) as writer:
            for key, image, caption, meta in samples:
                data = image if isinstance(image, bytes) else encode_image(image, "jpg")
                writer.write(
                    {
                        "__key__": key,
                        image_extension(data): data,
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
                count += 1

    atomic.write_with(path, write)
    return count


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def write_raw_shards(out_dir: str | Path, samples: Iterable[tuple], samples_per_shard: int) -> list[Path]:
    """Split ``(key, image, caption, meta)`` samples into ``out_dir/00000.tar, 00001.tar, ...``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    iterator = iter(samples)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, samples_per_shard))
        if not chunk:
            break
        paths.append(out_dir / shard_name(index))
        write_shard(paths[-1], chunk)
    return paths


# ---------------------------------------------------------------- command line


@dataclass
class SynthConfig:
    num_samples: int
    seed: int = 0
    samples_per_shard: int = 1000
    split: str = "train"
    image_size: tuple[int, int] = (96, 192)
    formats: tuple[str, ...] = ("jpg",)
    caption_mismatch: float = 0.0  # share of captions replaced by another scene's
    caption_corrupt: float = 0.0  # share of captions with wrong colours and dropped words

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        low, high = self.image_size
        if not 48 <= low <= high <= 4096:
            raise ValueError(f"--image-size needs 48 <= MIN <= MAX <= 4096, got {low} {high}")
        unknown = [f for f in self.formats if f not in IMAGE_FORMATS]
        if not self.formats or unknown:
            raise ValueError(
                f"--formats takes a comma list of {','.join(IMAGE_FORMATS)}, got {','.join(self.formats)!r}"
            )
        for flag, share in (("--caption-mismatch", self.caption_mismatch), ("--caption-corrupt", self.caption_corrupt)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{flag} is a share of the captions, in [0, 1], got {share}")
        if self.caption_mismatch + self.caption_corrupt > 1.0:
            raise ValueError(
                "--caption-mismatch + --caption-corrupt must be <= 1 (each caption gets at most one kind of noise), "
                f"got {self.caption_mismatch} + {self.caption_corrupt}"
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m preprocess synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory for NNNNN.tar shards")
    parser.add_argument("--num-samples", required=True, type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--split", default="train", help="train (no held-out pairs) or heldout (one or more)")
    parser.add_argument("--image-size", nargs=2, type=int, default=[96, 192], metavar=("MIN", "MAX"))
    parser.add_argument(
        "--formats", default="jpg", help=f"comma list of {','.join(IMAGE_FORMATS)}, chosen per sample"
    )
    parser.add_argument(
        "--caption-mismatch", type=float, default=0.0, metavar="P", help="share of captions replaced by another scene's"
    )
    parser.add_argument(
        "--caption-corrupt", type=float, default=0.0, metavar="Q",
        help="share of captions with wrong colours and a fifth of the other words dropped",
    )
    return parser


def cli(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
        config = SynthConfig(
            num_samples=args.num_samples,
            seed=args.seed,
            samples_per_shard=args.samples_per_shard,
            split=args.split,
            image_size=tuple(args.image_size),
            formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            caption_mismatch=args.caption_mismatch,
            caption_corrupt=args.caption_corrupt,
        )
        pending = _prepare_out_dir(args.out, config)
    except (_UsageError, ValueError, OSError) as err:
        print(f"synth: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)

    skipped = config.num_shards - len(pending)
    if skipped:
        log.info("%s: %d of %d shards already written, resuming", args.out, skipped, config.num_shards)
    with tqdm(
        total=config.num_samples, initial=skipped * config.samples_per_shard, desc="synth", unit="img"
    ) as bar:
        for shard in pending:
            first = shard * config.samples_per_shard
            indices = range(first, min(first + config.samples_per_shard, config.num_samples))
            samples = (
                make_sample(
                    config.seed, config.split, i, config.image_size, config.formats,
                    config.caption_mismatch, config.caption_corrupt,
                )
                for i in indices
            )
            write_shard(args.out / shard_name(shard), samples)
            bar.update(len(indices))
    log.info(
        "%s: %d samples in %d shards (split %s, seed %d)",
        args.out,
        config.num_samples,
        config.num_shards,
        config.split,
        config.seed,
    )
    return 0


def prepare_shard_dir(out: Path, config: Any, config_file: str, command: str) -> None:
    """Check ``out`` is writable and holds nothing but shards of a run of ``command`` with the same
    ``config`` (a dataclass, saved as ``config_file``), then save ``config`` there: shards already
    in place are then that run's, and a rerun may keep them."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{command}-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"--out {out}: not a writable directory ({err.strerror or err})") from None
    config_path = out / config_file
    if config_path.exists():
        try:
            previous = from_dict(
                type(config), yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path)
            )
        except ConfigError as err:
            raise ValueError(f"{config_path}: unreadable ({err}); remove it or use another --out") from None
        if asdict(previous) != asdict(config):
            raise ValueError(
                f"--out {out} holds shards from a different {command} run ({config_path}); use another --out"
            )
    elif any(out.glob("*.tar")):
        raise ValueError(f"--out {out} already holds .tar files not written by {command}; use another --out")
    dump_yaml(config, config_path)
    atomic.remove_leftovers(out)  # what a killed run was writing


def _prepare_out_dir(out: Path, config: SynthConfig) -> list[int]:
    """Prepare ``out`` (``prepare_shard_dir``); return the shards still to write."""
    prepare_shard_dir(out, config, SHARD_CONFIG_FILE, "synth")
    return [s for s in range(config.num_shards) if not (out / shard_name(s)).exists()]
