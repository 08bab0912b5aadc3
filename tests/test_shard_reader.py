"""The fast shard reader gives what webdataset's tarfile reader and ``np.load`` give, and says
clearly which shard and member are broken."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from pretrain_shards import make_feature_samples, write_feature_shards

import preprocess.feature_format
import pretrain.data
from preprocess.feature_format import decode_feature_sample
from preprocess.shard_reader import ShardError, read_npy, tar_samples
from pretrain.data import (
    build_eval_batches,
    build_train_loader,
    read_eval_samples,
)
from pretrain.data_config import DataConfig
from pretrain.masking_config import MaskingConfig


def raise_all(shard, exn):
    raise exn


def fast(path):
    return list(tar_samples(raise_all)([{"url": str(path)}]))


def reference(path):
    return list(wds.tarfile_to_samples()([{"url": str(path)}]))


def write_tar(path, samples, **writer):
    with wds.TarWriter(str(path), **writer) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.mark.parametrize("writer", [{"mtime": 0}, {}], ids=["mtime0", "float-mtime-pax"])
def test_samples_match_webdataset(tmp_path, writer):
    samples = make_feature_samples(5, feature_dim=8, seed=1)
    samples[2]["__key__"] = "k" * 150  # longer than a ustar name: a pax path record
    samples[3]["Extra.TXT"] = b""  # empty member; suffixes are lower-cased as webdataset does
    write_tar(tmp_path / "a.tar", samples, **writer)
    got, want = fast(tmp_path / "a.tar"), reference(tmp_path / "a.tar")
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want] and len(got) == 5
    assert got == want  # same members, bytes equal (ours are bytearrays)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float16).reshape(4, 6),
        np.zeros((0, 5), dtype=np.float32),
        np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        np.arange(5, dtype=">i4"),
        np.array([True, False]),
        np.array(3.5),
    ],
    ids=["float16", "empty", "fortran", "big-endian", "bool", "scalar"],
)
def test_read_npy_matches_np_load(array):
    buf = io.BytesIO()
    np.save(buf, array)
    data = bytearray(buf.getvalue())
    got, want = read_npy(data), np.load(io.BytesIO(bytes(data)))
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable  # a view of the bytearray, usable by torch.from_numpy without a copy
    with pytest.raises(ValueError, match="truncated"):
        read_npy(data[:-1] if array.size else data[:20])


def test_truncated_and_corrupt_shards_name_the_member(tmp_path):
    write_tar(tmp_path / "good.tar", make_feature_samples(3, feature_dim=8, seed=2, key_prefix="s"), mtime=0)
    whole = (tmp_path / "good.tar").read_bytes()
    for cut_at in (len(whole) // 2 + 100, 512 * 6):  # inside a member; between members (no end blocks)
        (tmp_path / "cut.tar").write_bytes(whole[:cut_at])
        with pytest.raises(ShardError) as cut:
            fast(tmp_path / "cut.tar")
        message = str(cut.value)
        assert "\n" not in message and str(tmp_path / "cut.tar") in message and "cut short" in message
        assert "member s00000" in message  # the member names its sample's key
    corrupt = bytearray(whole)
    corrupt[1024 + 10] ^= 0xFF  # inside the second header (the first member is under 512 bytes)
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match=r"corrupt\.tar: corrupt tar header after member s000000\.[\w.]+ \(checksum"):
        fast(tmp_path / "corrupt.tar")


def test_bad_npy_member_names_the_sample(tmp_path):
    sample = make_feature_samples(1, feature_dim=8, seed=3, key_prefix="bad")[0]
    sample["features.npy"] = sample["features.npy"][:-7]
    write_tar(tmp_path / "0.tar", [sample], mtime=0)
    (raw,) = fast(tmp_path / "0.tar")
    with pytest.raises(ValueError) as error:
        decode_feature_sample(raw, num_classes=5)
    message = str(error.value)
    assert "\n" not in message and "sample bad000000" in message and "0.tar" in message
    assert "features.npy" in message and "truncated" in message


def batches(pattern, tokenizer, spec, num_workers):
    data = DataConfig(batch_size=6, num_workers=num_workers, shuffle_buffer=20)
    train = list(itertools.islice(iter(build_train_loader(pattern, tokenizer, spec, data, MaskingConfig(), 4, 0, 1)), 6))
    return train + build_eval_batches(pattern, tokenizer, spec, data, MaskingConfig(), seed=2, max_samples=30)


def assert_same_batches(one, two):
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert list(a) == list(b) and a["keys"] == b["keys"]
        for name, value in a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == b[name].dtype and torch.equal(value, b[name]), name


@pytest.mark.parametrize("label_format", ["distribution", "topk"])
def test_batches_match_the_tarfile_reader(tmp_path, tokenizer, label_format, monkeypatch):
    pattern, spec = write_feature_shards(tmp_path, 3, 12, feature_dim=16, label_format=label_format)
    # One worker (id 0) draws what the main process draws: this covers the shared-memory hand-over too.
    new = batches(pattern, tokenizer, spec, num_workers=1)
    # The loader as it was: webdataset's tarfile reader and np.load through BytesIO.
    monkeypatch.setattr(pretrain.data, "tar_samples", lambda on_error: wds.tarfile_to_samples(handler=wds.reraise_exception))
    monkeypatch.setattr(preprocess.feature_format, "read_npy",
                        lambda data: np.load(io.BytesIO(bytes(data)), allow_pickle=False))
    assert_same_batches(new, batches(pattern, tokenizer, spec, num_workers=0))


def test_bad_shards_are_skipped_with_one_line(tmp_path, tokenizer, caplog):
    pattern, spec = write_feature_shards(tmp_path, 2, 4, feature_dim=16)
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) * 2 // 3])
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        samples = read_eval_samples(pattern, tokenizer, spec, DataConfig(), 100)
    assert [s["key"] for s in samples][:4] == [f"00000{i:06d}" for i in range(4)]
    (record,) = [r for r in caplog.records if "cut short" in r.getMessage()]
    assert "00001.tar: cut short after member 00001" in record.getMessage()
