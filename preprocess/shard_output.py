"""Writing the extraction outputs so that a kill at any point is resumable.

Layout of an output directory::

    DIR/<name>.tar                      finished feature shards (one per input shard)
    DIR/.<name>.tar.incomplete          a shard being written (removed or replaced on rerun)
    DIR/.parts/<name>.skipped.parquet   that shard's skipped rows
    DIR/.parts/<name>.manifest.parquet  that shard's manifest rows; written LAST: its presence
                                        is what marks the shard complete
    DIR/manifest.parquet, DIR/skipped.parquet, DIR/summary.json
                                        assembled from all parts once every shard is complete

Every file is written atomically (``preprocess.atomic``), so readers and concurrent workers only
ever see whole files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds

from preprocess.atomic import temp_name, write_json, write_table
from preprocess.feature_format import MANIFEST_FILE, SKIPPED_FILE
from preprocess.raw_input import InputShard, SkippedSample

PARTS_DIR = ".parts"
SUMMARY_FILE = "summary.json"
INCOMPLETE_SUFFIX = ".incomplete"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source_shard", pa.string()),
        ("source_index", pa.int64()),
        ("num_boxes", pa.int32()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("caption_chars", pa.int32()),
    ]
)
SKIPPED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_shard", pa.string()),
        ("source_index", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def manifest_part(output_dir: Path, name: str) -> Path:
    return output_dir / PARTS_DIR / f"{name}.manifest.parquet"


def skipped_part(output_dir: Path, name: str) -> Path:
    return output_dir / PARTS_DIR / f"{name}.skipped.parquet"


def incomplete_tar(output_dir: Path, name: str) -> Path:
    return output_dir / f".{name}{INCOMPLETE_SUFFIX}"


def is_complete(output_dir: Path, name: str) -> bool:
    return manifest_part(output_dir, name).is_file()


class ShardOutput:
    """One output shard in progress: a webdataset TarWriter on a hidden name, plus its rows."""

    def __init__(self, output_dir: Path, shard: InputShard):
        self.output_dir = output_dir
        self.shard = shard
        self.tmp_path = incomplete_tar(output_dir, shard.name)
        self.file = open(self.tmp_path, "wb")
        # mtime fixed so that a redone shard is byte-identical to an uninterrupted run's.
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=0)
        self.manifest_rows: list[dict[str, Any]] = []
        self.skipped_rows: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any], source_index: int, num_boxes: int, width: int, height: int, caption: str) -> None:
        self.writer.write(sample)
        self.manifest_rows.append(
            {
                "key": sample["__key__"],
                "shard": self.shard.name,
                "source_shard": self.shard.url,
                "source_index": source_index,
                "num_boxes": num_boxes,
                "image_width": width,
                "image_height": height,
                "caption_chars": len(caption),
            }
        )

    def skip(self, skipped: SkippedSample) -> None:
        self.skipped_rows.append(
            {
                "key": skipped.key,
                "source_shard": self.shard.url,
                "source_index": skipped.index,
                "reason": skipped.reason,
                "detail": skipped.detail,
            }
        )

    def commit(self) -> tuple[int, Counter]:
        """Finish the tar, move it into place, then write the parts (manifest last = done)."""
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp_path, self.output_dir / self.shard.name)
        # Rows sorted by position in the source shard: skips found in a worker and samples
        # that went through the detector arrive in different streams.
        skipped = sorted(self.skipped_rows, key=lambda r: r["source_index"])
        manifest = sorted(self.manifest_rows, key=lambda r: r["source_index"])
        write_table(skipped_part(self.output_dir, self.shard.name), pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA))
        write_table(manifest_part(self.output_dir, self.shard.name), pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
        return len(manifest), Counter(r["reason"] for r in skipped)

    def abort(self) -> None:
        """Drop the partial shard (a shard that could not be read is retried by the next run)."""
        self.writer.close()
        self.file.close()
        self.tmp_path.unlink(missing_ok=True)


def prepare_output_dir(output_dir: Path) -> None:
    """Create DIR and DIR/.parts and prove they are writable; raises OSError naming the path."""
    try:
        (output_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = temp_name(output_dir / PARTS_DIR / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output directory {output_dir} is not writable ({err.strerror or err})") from None


def assemble_tables(output_dir: Path, shards: list[InputShard]) -> dict[str, Any] | None:
    """If every shard is complete, (re)build manifest.parquet, skipped.parquet and summary.json
    from the parts, in input order, and return the summary; otherwise return None.

    Any worker may call this when it finishes: the last one to finish sees all parts. Two
    workers doing it at once write identical files, each replaced atomically.
    """
    if not all(is_complete(output_dir, s.name) for s in shards):
        return None
    manifest = pa.concat_tables([pq.read_table(manifest_part(output_dir, s.name), schema=MANIFEST_SCHEMA) for s in shards])
    skipped = pa.concat_tables([pq.read_table(skipped_part(output_dir, s.name), schema=SKIPPED_SCHEMA) for s in shards])
    write_table(output_dir / MANIFEST_FILE, manifest)
    write_table(output_dir / SKIPPED_FILE, skipped)
    reasons = Counter(skipped.column("reason").to_pylist())
    summary = {
        "shards": len(shards),
        "written": manifest.num_rows,
        "skipped": skipped.num_rows,
        "skipped_by_reason": dict(sorted(reasons.items())),
        "boxes": int(pc.sum(manifest.column("num_boxes")).as_py() or 0),
        # Every worker run that touched this directory (each also logged its own summary).
        "runs": [json.loads(p.read_text(encoding="utf-8")) for p in sorted((output_dir / PARTS_DIR).glob("run-*.json"))],
    }
    write_json(output_dir / SUMMARY_FILE, summary)
    return summary
