"""Writing the extraction outputs so that a kill at any point is resumable.

Layout of an output location (a directory, or a prefix in an object store: ``preprocess.storage``)::

    <name>.tar                      finished feature shards (one per input shard)
    .<name>.tar.incomplete          a shard being written, local output only (removed or replaced
                                    on rerun); for a bucket it is written in the machine's temporary
                                    directory and uploaded when finished
    .parts/<name>.skipped.parquet   that shard's skipped rows
    .parts/<name>.manifest.parquet  that shard's manifest rows; written LAST: its presence
                                    is what marks the shard complete
    .parts/run-*.json               each worker run's summary
    manifest.parquet, skipped.parquet, summary.json
                                    assembled from all parts once every shard is complete

Every file is written atomically (``preprocess.storage.Location``), so readers and concurrent
workers only ever see whole files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import webdataset as wds

from preprocess.feature_format import MANIFEST_FILE, SKIPPED_FILE
from preprocess.raw_input import InputShard, SkippedSample
from preprocess.storage import Location

PARTS_DIR = ".parts"
SUMMARY_FILE = "summary.json"
MANIFEST_PART_SUFFIX = ".manifest.parquet"

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
        ("image_id", pa.int64()),
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


def manifest_part(name: str) -> str:
    return f"{PARTS_DIR}/{name}{MANIFEST_PART_SUFFIX}"


def skipped_part(name: str) -> str:
    return f"{PARTS_DIR}/{name}.skipped.parquet"


def complete_shards(output: Location) -> set[str]:
    """Names of the shards whose manifest part is written (one fresh listing)."""
    return {n[: -len(MANIFEST_PART_SUFFIX)] for n in output.names(PARTS_DIR) if n.endswith(MANIFEST_PART_SUFFIX)}


class ShardOutput:
    """One output shard in progress: a webdataset TarWriter on a hidden name, plus its rows."""

    def __init__(self, output: Location, shard: InputShard):
        self.output = output
        self.shard = shard
        self.tmp_path: Path = output.spool_file(shard.name)
        self.file = open(self.tmp_path, "wb")
        # mtime fixed so that a redone shard is byte-identical to an uninterrupted run's.
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=0)
        self.manifest_rows: list[dict[str, Any]] = []
        self.skipped_rows: list[dict[str, Any]] = []

    def write(
        self, sample: dict[str, Any], source_index: int, num_boxes: int, width: int, height: int, caption: str,
        image_id: int | None,
    ) -> None:
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
                "image_id": image_id,
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
        """Finish the tar, move (or upload) it into place, then write the parts (manifest last = done)."""
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.output.put(self.tmp_path, self.shard.name)
        # Rows sorted by position in the source shard: skips found in a worker and samples
        # that went through the detector arrive in different streams.
        skipped = sorted(self.skipped_rows, key=lambda r: r["source_index"])
        manifest = sorted(self.manifest_rows, key=lambda r: r["source_index"])
        self.output.write_table(skipped_part(self.shard.name), pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA))
        self.output.write_table(manifest_part(self.shard.name), pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
        return len(manifest), Counter(r["reason"] for r in skipped)

    def abort(self) -> None:
        """Drop the partial shard (a shard that could not be read or written is redone by the next run)."""
        if not self.file.closed:
            self.writer.close()
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)


def assemble_tables(output: Location, shards: list[InputShard]) -> dict[str, Any] | None:
    """If every shard is complete, (re)build manifest.parquet, skipped.parquet and summary.json
    from the parts, in input order, and return the summary; otherwise return None.

    Any worker may call this when it finishes: the last one to finish sees all parts. Two
    workers doing it at once write identical files, each replaced atomically.
    """
    complete = complete_shards(output)
    if not all(s.name in complete for s in shards):
        return None
    manifest = pa.concat_tables([output.read_table(manifest_part(s.name), MANIFEST_SCHEMA) for s in shards])
    skipped = pa.concat_tables([output.read_table(skipped_part(s.name), SKIPPED_SCHEMA) for s in shards])
    output.write_table(MANIFEST_FILE, manifest)
    output.write_table(SKIPPED_FILE, skipped)
    reasons = Counter(skipped.column("reason").to_pylist())
    runs = sorted(n for n in output.names(PARTS_DIR) if n.startswith("run-") and n.endswith(".json"))
    summary = {
        "shards": len(shards),
        "written": manifest.num_rows,
        "skipped": skipped.num_rows,
        "skipped_by_reason": dict(sorted(reasons.items())),
        "boxes": int(pc.sum(manifest.column("num_boxes")).as_py() or 0),
        # Every worker run that touched this location (each also logged its own summary).
        "runs": [json.loads(output.read_text(f"{PARTS_DIR}/{n}")) for n in runs],
    }
    output.write_json(SUMMARY_FILE, summary)
    return summary
