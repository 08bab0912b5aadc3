"""Atomic writes: a reader (or a rerun after a kill) sees the old file or the whole new one, never part.

Every writer in the project goes through here. A file is written under a temporary name that
is unique to the process and thread (concurrent array tasks and threads never share one),
flushed and fsynced, then ``os.replace``d onto its final name. A directory (a release, an
exported model) is built in a sibling temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other process or thread uses."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``; returns them.

    Only for a directory that one process writes at a time: another writer's temporary file
    may be in use.
    """
    leftovers = sorted(Path(directory).glob(".*.tmp-*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def write_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(file)`` on a temporary file, fsync it, then move it onto ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_table(path: str | Path, table) -> None:
    """A ``pyarrow.Table`` as Parquet."""
    import pyarrow.parquet as pq

    write_with(path, lambda f: pq.write_table(table, f))


@contextlib.contextmanager
def replace_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty sibling temporary directory; on success it replaces ``out_dir``.

    If the body raises, ``out_dir`` is left as it was and the temporary directory is removed.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
