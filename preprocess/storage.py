"""Where shards and their tables live: a local directory or a prefix in an object store.

Every shard location the stages take may be a local path or an fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``az://...``; the store's fsspec package must be installed: ``s3fs``, ``gcsfs``,
``adlfs``). Credentials and endpoints come from each store's client library and its standard
environment and files (S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``,
``~/.aws/credentials``, ``AWS_ENDPOINT_URL`` for an S3-compatible server), never from the project's
configs. A URL with credentials written into it is refused, so they cannot reach a log, a summary
or a saved config.

Writes are atomic in both places. A local file is written under a temporary name and renamed
(``preprocess.atomic``). An object is uploaded under its final name: an object store shows an object
only once its upload completes, so a killed upload leaves nothing behind. Other fsspec filesystems
(sftp, hdfs, ...) get a temporary name and a move.

Listings are always fresh (fsspec's listing cache is dropped first): other workers write to the same
prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

import braceexpand

from preprocess import atomic

# Stores whose upload makes an object appear whole or not at all (a multipart upload too).
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
# Schemes webdataset opens itself (its gopen): pipes and plain web URLs are streamed, never listed.
STREAM_SCHEMES = {"pipe", "http", "https"}
# Reading a shard from a bucket: S3 objects stream from one GET through a buffer of this size;
# other stores read through fsspec's read-ahead cache in blocks of this size.
READ_BUFFER_BYTES = 8 << 20
READ_BLOCK_BYTES = 32 << 20


class StorageError(OSError):
    """A location cannot be read, listed or written; the message names it and the cause, in one line."""


class NotFound(FileNotFoundError):
    """A file or object that does not exist, named in the message (callers catch FileNotFoundError)."""


def scheme_of(location: str) -> str:
    """``s3`` for ``s3://b/k``, ``pipe`` for ``pipe:cmd``, ``""`` for a local path."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(location).scheme
    return "" if len(scheme) <= 1 else scheme  # a Windows drive letter is not a scheme


def is_remote(location: str) -> bool:
    """True for fsspec URLs that need a filesystem object (not local paths, ``file://``, pipes or http)."""
    return scheme_of(location) not in ("", "file", *STREAM_SCHEMES)


def check_url(location: str) -> None:
    """Refuse credentials in a URL (``s3://KEY:SECRET@bucket/...``): they would be logged and saved
    with the config. (Not ``urlparse``: a secret with a ``/`` in it would end its netloc early.)"""
    scheme = scheme_of(location)
    if scheme in ("", "pipe"):
        return
    userinfo, at, rest = location.split("://", 1)[-1].partition("@")
    if at and ":" in userinfo:
        raise StorageError(
            f"{scheme}://...@{rest}: credentials must not be written into URLs (they would be logged and "
            f"saved); give them to the store's client library (environment or config files)"
        )


def local_path(location: str) -> Path:
    return Path(urlparse(location).path if scheme_of(location) == "file" else location)


def join(root: str, name: str) -> str:
    """``name`` inside ``root`` (a directory or a URL prefix)."""
    if is_remote(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def parent(location: str) -> str:
    """The directory or URL prefix that holds ``location``."""
    if is_remote(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(local_path(location).parent)


def resolve(root: str, pattern: str) -> str:
    """A shard pattern relative to ``root``; absolute paths, URLs and pipes are kept as they are."""
    if not pattern or not root or os.path.isabs(pattern) or scheme_of(pattern):
        return pattern
    return join(root, pattern)


def expand(spec: str) -> list[str]:
    """``a/{000..009}.tar::b/{00..03}.tar`` -> locations (``::`` joins patterns, as in webdataset)."""
    locations: list[str] = []
    for pattern in spec.split("::"):
        pattern = pattern.strip()
        if pattern:
            check_url(pattern)
            locations.extend(braceexpand.braceexpand(pattern))
    return locations


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{err.__class__.__name__}: {text}"[:300]


@contextlib.contextmanager
def _reported(location: str, doing: str) -> Iterator[None]:
    """Turn a filesystem client's failure (missing package, network, credentials) into one StorageError line."""
    try:
        yield
    except (StorageError, NotFound):
        raise
    except Exception as err:  # fsspec clients raise their own types (botocore, aiohttp, ...)
        raise StorageError(f"{location}: cannot {doing} ({_cause(err)})") from err


def filesystem(location: str):
    """``(fsspec filesystem, path inside it)`` for a remote location."""
    # The AWS clients log at INFO where they found credentials, once per process and worker.
    for name in ("botocore", "aiobotocore", "s3fs"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    with _reported(location, "open its filesystem"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
    return fs, path


def open_for_reading(location: str) -> BinaryIO:
    """A readable binary stream, front to back: local files and webdataset's schemes (``pipe:``,
    http) through its gopen; S3 objects as one streamed GET; other stores through fsspec with a
    read-ahead cache."""
    if not is_remote(location):
        from webdataset.gopen import gopen

        return gopen(location, "rb")
    fs, path = filesystem(location)
    with _reported(location, "open for reading"):
        if "s3" in _protocols(fs):
            return io.BufferedReader(_S3ObjectStream(fs, path), READ_BUFFER_BYTES)
        return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")


class _S3ObjectStream(io.RawIOBase):
    """An S3 object as one streamed GET. Shards are read once, front to back; s3fs's file objects
    send a range request per read-ahead block instead, which delivered 0.55-0.66 of the loader's
    local rate where this delivers about 0.8 (docs/benchmarks.md, "Loader reading from a bucket")."""

    def __init__(self, fs, path: str):
        bucket, key, version = fs.split_path(path)
        self.fs = fs
        extra = {"VersionId": version} if version else {}
        self.body = fs.call_s3("get_object", Bucket=bucket, Key=key, **extra)["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        from fsspec.asyn import sync

        data = sync(self.fs.loop, self.body.read, len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            from fsspec.asyn import sync

            sync(self.fs.loop, self._close_body)  # the response belongs to the loop's thread
        super().close()

    async def _close_body(self) -> None:
        self.body.close()


def _protocols(fs) -> set[str]:
    return set(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else {fs.protocol}


def missing(locations: list[str]) -> list[str]:
    """The locations that do not exist: local files checked one by one, objects by one fresh listing
    per prefix. Pipes and web URLs are not checked (only reading them can tell)."""
    absent: list[str] = []
    by_parent: dict[str, list[str]] = defaultdict(list)
    for location in locations:
        scheme = scheme_of(location)
        if scheme in STREAM_SCHEMES:
            continue
        if not is_remote(location):
            if not local_path(location).is_file():
                absent.append(location)
        else:
            by_parent[parent(location)].append(location)
    for prefix, wanted in by_parent.items():
        listed = Location(prefix).names()
        absent.extend(w for w in wanted if w.rstrip("/").rsplit("/", 1)[1] not in listed)
    return absent


def check_exist(spec: str, what: str) -> list[str]:
    """The expanded ``spec``; raises StorageError naming the first location that does not exist."""
    locations = expand(spec)
    if not locations:
        raise StorageError(f"{what} {spec!r} names no shard")
    absent = missing(locations)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise StorageError(f"{what} {spec!r}: {absent[0]} does not exist{more}")
    return locations


def read_bytes(location: str) -> bytes:
    """A whole file or object; FileNotFoundError naming it if there is none."""
    if not is_remote(location):
        path = local_path(location)
        if not path.is_file():
            raise NotFound(f"{location} does not exist")
        return path.read_bytes()
    fs, path = filesystem(location)
    with _reported(location, "read"):
        try:
            return fs.cat_file(path)
        except FileNotFoundError as err:
            raise NotFound(f"{location} does not exist") from err


class Location:
    """A directory or object prefix that a job writes into: atomic writes, fresh listings, uploads."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        check_url(self.root)
        self.remote = is_remote(self.root)
        if self.remote:
            self.fs, self.path = filesystem(self.root)
            self.atomic_put = bool(OBJECT_STORES & _protocols(self.fs))
        else:
            self.dir = local_path(self.root)

    def __str__(self) -> str:
        return self.root

    def url(self, name: str) -> str:
        return join(self.root, name)

    def _remote_path(self, name: str) -> str:
        return self.path.rstrip("/") + "/" + name

    # ------------------------------------------------------------ reading

    def names(self, subdir: str = "") -> set[str]:
        """Names of the files directly in ``subdir`` (empty if it does not exist)."""
        if not self.remote:
            directory = self.dir / subdir if subdir else self.dir
            return {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
        path = self._remote_path(subdir) if subdir else self.path
        with _reported(self.url(subdir), "list"):
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return set()
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory"}

    def read_bytes(self, name: str) -> bytes:
        return read_bytes(self.url(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    # ------------------------------------------------------------ writing

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically: readers see the old file (or none) or all of ``data``."""
        if not self.remote:
            atomic.write_bytes(self.dir / name, data)
            return
        final = self._remote_path(name)
        with _reported(self.url(name), "write"):
            if self.atomic_put:
                self.fs.pipe_file(final, data)
            else:
                tmp = self._remote_path(_temp_name(name))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, final)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def write_table(self, name: str, table) -> None:
        """A ``pyarrow.Table`` as Parquet."""
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue())

    def read_table(self, name: str, schema=None):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(name)), schema=schema)

    def delete(self, name: str) -> None:
        """Remove ``name`` if it is there."""
        if not self.remote:
            (self.dir / name).unlink(missing_ok=True)
            return
        # Deleting what is not there is what this method promises (S3 itself does not complain;
        # other stores raise FileNotFoundError).
        with _reported(self.url(name), "delete"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._remote_path(name))

    def spool_file(self, name: str) -> Path:
        """The local file a big output (a shard) is written to before ``put`` moves it into place.

        Local: a hidden file in the directory itself (the move is a rename). Remote: a file in the
        machine's temporary directory named after this location and ``name``, so a rerun
        overwrites what a killed run left.
        """
        if not self.remote:
            return self.dir / f".{name}.incomplete"
        digest = hashlib.sha1(self.root.rstrip("/").encode("utf-8")).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"vlpretrain-spool-{digest}-{name}.incomplete"

    def put(self, local_file: Path, name: str) -> None:
        """Move a finished local file (a ``spool_file``) into place as ``name``, atomically."""
        if not self.remote:
            os.replace(local_file, self.dir / name)
            return
        final = self._remote_path(name)
        with _reported(self.url(name), "upload"):
            if self.atomic_put:
                self.fs.put_file(str(local_file), final)
            else:
                tmp = self._remote_path(_temp_name(name))
                self.fs.put_file(str(local_file), tmp)
                self.fs.mv(tmp, final)
        local_file.unlink()

    def prepare(self, subdir: str) -> None:
        """Create the location (and ``subdir``) and prove it writable; StorageError naming it otherwise."""
        probe = f"{subdir}/{_temp_name('write-probe')}"
        if not self.remote:
            try:
                (self.dir / subdir).mkdir(parents=True, exist_ok=True)
                atomic.write_bytes(self.dir / probe, b"")
                (self.dir / probe).unlink()
            except OSError as err:
                raise StorageError(f"output directory {self.root} is not writable ({err.strerror or err})") from None
            return
        try:
            if not self.atomic_put:  # object stores have no directories to create
                with _reported(self.root, "create"):
                    self.fs.makedirs(self._remote_path(subdir), exist_ok=True)
            self.write_bytes(probe, b"")
            self.delete(probe)
        except StorageError as err:
            raise StorageError(f"output {self.root} is not writable ({_cause(err.__cause__ or err)})") from None


def _temp_name(name: str) -> str:
    """A hidden sibling of ``name`` (which may be ``subdir/file``) that no other process or thread uses."""
    return str(atomic.temp_name(PurePosixPath(name)))
