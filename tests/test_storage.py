"""``preprocess.storage``: locations that are local directories or bucket prefixes. These run on
fsspec's in-memory filesystem (an object store in this process); ``tests/test_bucket.py`` runs the
stages against a real S3-compatible server."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from preprocess import storage
from preprocess.storage import Location, StorageError


@pytest.fixture
def bucket() -> str:
    """A fresh prefix in the in-memory filesystem."""
    return f"memory://storage-test-{uuid.uuid4().hex[:8]}"


def test_paths_join_and_resolve_in_both_worlds(tmp_path):
    assert storage.join("s3://b/features/", "train/00000.tar") == "s3://b/features/train/00000.tar"
    assert storage.join(str(tmp_path), "a.tar") == str(tmp_path / "a.tar")
    assert storage.parent("s3://b/features/00001.tar") == "s3://b/features"
    assert storage.parent(str(tmp_path / "x.tar")) == str(tmp_path)
    assert storage.resolve("s3://b/f", "train/{00000..00003}.tar") == "s3://b/f/train/{00000..00003}.tar"
    assert storage.resolve("/data", "train/0.tar") == "/data/train/0.tar"
    for absolute in ("/elsewhere/0.tar", "gs://other/0.tar", "pipe:cat 0.tar"):
        assert storage.resolve("s3://b/f", absolute) == absolute
    assert storage.expand("s3://b/{0..1}.tar::/d/{a,b}.tar") == ["s3://b/0.tar", "s3://b/1.tar", "/d/a.tar", "/d/b.tar"]
    assert [storage.is_remote(x) for x in ("s3://b/k", "memory://k", "/d/k", "file:///d/k", "pipe:cat k", "https://h/k")] == \
           [True, True, False, False, False, False]


@pytest.mark.parametrize("url", ["s3://AKIA123:abc/def+ghi@bucket/prefix", "gs://user:pw@bucket/x.tar"])
def test_credentials_in_urls_are_refused_without_repeating_them(url):
    with pytest.raises(StorageError, match="credentials must not be written into URLs") as caught:
        storage.expand(url)
    assert "abc/def" not in str(caught.value) and "pw" not in str(caught.value)
    storage.check_url("sftp://user@host/data/0.tar")  # a user name alone is not a secret


def test_location_writes_atomically_lists_freshly_and_uploads(bucket, tmp_path):
    out = Location(bucket)
    assert out.remote and out.atomic_put
    out.prepare(".parts")
    assert out.names(".parts") == set(), "the write probe must not stay behind"
    out.write_json("summary.json", {"a": 1})
    assert out.read_text("summary.json") == '{\n  "a": 1\n}\n'
    spool = out.spool_file("00000.tar")
    assert spool.name.startswith("vlpretrain-spool-") and spool.name.endswith("-00000.tar.incomplete")
    spool.write_bytes(b"tar bytes")
    out.put(spool, "00000.tar")
    assert not spool.exists() and out.read_bytes("00000.tar") == b"tar bytes"
    # Another writer adds an object behind this location's back: the next listing sees it.
    fsspec.filesystem("memory").pipe_file(f"{bucket.removeprefix('memory://')}/00001.tar", b"x")
    assert out.names() == {"summary.json", "00000.tar", "00001.tar"}
    out.delete("00001.tar")
    out.delete("00001.tar")  # deleting what is gone is fine
    assert out.names() == {"summary.json", "00000.tar"}
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        out.read_bytes("nothing.json")


def test_stores_without_atomic_uploads_get_a_temporary_name_and_a_move(bucket, monkeypatch):
    out = Location(bucket)
    out.atomic_put = False  # as for sftp or hdfs
    moves = []
    original = out.fs.mv
    monkeypatch.setattr(out.fs, "mv", lambda a, b, **kw: (moves.append((a, b)), original(a, b, **kw)))
    out.write_bytes("feature_spec.json", b"{}")
    assert len(moves) == 1 and ".feature_spec.json.tmp-" in moves[0][0] and moves[0][1].endswith("/feature_spec.json")
    assert out.names() == {"feature_spec.json"}


def test_missing_lists_each_prefix_once_and_names_what_is_absent(bucket, tmp_path, monkeypatch):
    memory = fsspec.filesystem("memory")
    for i in (0, 2):
        memory.pipe_file(f"{bucket.removeprefix('memory://')}/train/{i:05d}.tar", b"x")
    (tmp_path / "00000.tar").write_bytes(b"x")
    listings = []
    original = memory.ls
    monkeypatch.setattr(memory, "ls", lambda path, **kw: (listings.append(path), original(path, **kw))[1])
    spec = f"{bucket}/train/{{00000..00003}}.tar::{tmp_path}/{{00000..00001}}.tar::pipe:cat x.tar"
    absent = storage.missing(storage.expand(spec))
    assert sorted(absent) == sorted([str(tmp_path / "00001.tar"), f"{bucket}/train/00001.tar", f"{bucket}/train/00003.tar"])
    assert listings == [f"/{bucket.removeprefix('memory://')}/train"], "one listing for the one prefix"
    with pytest.raises(StorageError, match=r"00001.tar does not exist \(and 2 more\)"):
        storage.check_exist(spec, "data.train")


def test_open_for_reading_streams_objects_and_local_files(bucket, tmp_path):
    fsspec.filesystem("memory").pipe_file(f"{bucket.removeprefix('memory://')}/a.tar", b"abc" * 1000)
    with storage.open_for_reading(f"{bucket}/a.tar") as stream:
        assert stream.read() == b"abc" * 1000
    (tmp_path / "b.tar").write_bytes(b"xyz")
    with storage.open_for_reading(str(tmp_path / "b.tar")) as stream:
        assert stream.read() == b"xyz"


def test_a_store_without_its_package_is_one_clear_error():
    with pytest.raises(StorageError, match=r"nosuchstore://b/x.tar: cannot open its filesystem \(ValueError: Protocol not known"):
        storage.read_bytes("nosuchstore://b/x.tar")
