"""Reading feature shards fast: tar members -> raw webdataset samples, ``.npy`` members -> arrays.

Python's ``tarfile`` (what ``webdataset.tarfile_to_samples`` uses) spent about a third of the
pretraining loader's time building ``TarInfo`` objects. Feature shards are plain uncompressed
tars whose members are small files, so this module parses the 512-byte headers itself and
reads each member into a ``bytearray`` (writable, so arrays decoded from it are too).
``np.load`` through ``BytesIO`` parsed every ``.npy`` header with ``ast.literal_eval``; here a
header is parsed once per distinct header and the array is a view of the member's bytes.

The samples are the ones ``webdataset.tarfile_to_samples`` yields for the same tar, member
for member (same keys, names and bytes; checked by ``tests/test_shard_reader.py``), except that
a shard that cannot be read to its end-of-archive block (cut short, corrupt header) gives one
error naming the shard and the last member read, and the sample being read then is dropped
rather than passed on, perhaps incomplete. (``tarfile`` stops quietly at a corrupt header or a
cut between members, and webdataset passes the last sample on as it is.)
"""

from __future__ import annotations

import ast
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from preprocess.storage import open_for_reading

BLOCK = 512
_END_BLOCK = bytes(BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names too
_REGULAR = (b"0", b"\0", b"7")  # regular file types (tarfile.REGULAR_TYPES minus GNU sparse)
_MAX_NPY_HEADER = 10_000  # np.load's default max_header_size: literal_eval on more is unsafe


class ShardError(ValueError):
    """A shard or one of its members cannot be read; the message names the shard and member."""


def _read_exactly(stream: BinaryIO, size: int) -> bytearray:
    """Up to ``size`` bytes (fewer only at the end of the stream) in a new bytearray."""
    readinto = getattr(stream, "readinto", None)
    if readinto is None:  # webdataset's Pipe streams have read only
        return bytearray(stream.read(size))
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        n = readinto(view[got:])
        if not n:
            del data[got:]
            break
        got += n
    return data


def _octal(field: bytes) -> int:
    return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def tar_members(stream: BinaryIO, url: str) -> Iterator[tuple[str, bytearray]]:
    """(name, data) of each regular file of an uncompressed tar, in order.

    Handles ustar and GNU headers, pax extended headers (``path``, ``size``) and GNU long
    names: what ``webdataset.TarWriter`` (through ``tarfile``) writes. Raises ``ShardError``
    on a bad checksum or a member cut short.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    name = "(start of the tar)"
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:  # tarfile stops quietly here when no bytes are left; a finished tar has end blocks
            raise ShardError(f"{url}: cut short after member {name} (no end-of-archive block)")
        if header == _END_BLOCK:
            return  # end-of-archive block
        checksum = sum(header) - sum(header[148:156]) + 8 * 0x20  # the checksum field counts as spaces
        try:
            stored = _octal(header[148:156])
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        except ValueError:
            raise ShardError(f"{url}: corrupt tar header after member {name}") from None
        if stored != checksum and stored != checksum - 256 * sum(b >= 0x80 for b in header):  # some tars sum signed bytes
            raise ShardError(f"{url}: corrupt tar header after member {name} (checksum mismatch)")
        kind = header[156:157]
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[345] != 0 and kind in _REGULAR:  # a ustar name prefix, read as tarfile does
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path", long_name or name)
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise ShardError(f"{url}: member {name} cut short ({len(data)} of {size} bytes)")
        padding = -size % BLOCK
        if padding and len(stream.read(padding)) < padding:
            raise ShardError(f"{url}: member {name} cut short (in its padding)")
        if kind == b"x":  # pax header: applies to the next member only
            pax = _pax_records(data)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield name, data


def shard_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", suffix: bytearray, ...}`` of one tar, grouped as
    ``webdataset.tarfile_to_samples`` groups them (consecutive members with the same key)."""
    sample: dict[str, Any] | None = None
    for name, data in tar_members(stream, url):
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        if _SKIP_META.match(name):
            continue
        key, suffix = base_plus_ext(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ShardError(f"{url}: sample {key} has member {suffix} twice")
        sample[suffix] = data
    if sample is not None:
        yield sample


def tar_samples(on_error: Callable[[str, BaseException], object]):
    """Pipeline stage: ``{"url": shard}`` items -> raw samples of each shard, in order.

    An error in a shard (missing file, corrupt or cut-short tar) goes to ``on_error(shard,
    error)``, and the stage goes on with the next shard (the samples before the error are kept).
    """

    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            url = source["url"]
            try:
                with open_for_reading(url) as stream:
                    yield from shard_samples(stream, url)
            except Exception as exn:
                on_error(url, exn)

    return stage


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes, encoding: str) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """(dtype, shape, element count, fortran_order) of a ``.npy`` header dict, as ``np.lib.format`` reads it."""
    fields = ast.literal_eval(header.decode(encoding))
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"not a .npy header: {header[:80]!r}")
    dtype = np.lib.format.descr_to_dtype(fields["descr"])
    shape = tuple(int(n) for n in fields["shape"])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed (they need pickle)")
    return dtype, shape, math.prod(shape), bool(fields["fortran_order"])


def read_npy(data: bytes | bytearray) -> np.ndarray:
    """The array of a ``.npy`` file's bytes, without copying them (a bytearray gives a writable array).

    Same result as ``np.load(io.BytesIO(data), allow_pickle=False)``; raises ``ValueError`` on a
    malformed or truncated file.
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        start, length = 10, int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        start, length = 12, int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unknown .npy format version {major}")
    if length > _MAX_NPY_HEADER or len(data) < start + length:
        raise ValueError("truncated or oversized .npy header")
    dtype, shape, count, fortran = _npy_header(bytes(data[start : start + length]), "utf8" if major == 3 else "latin1")
    offset = start + length
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy data truncated: {len(data) - offset} bytes for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")
