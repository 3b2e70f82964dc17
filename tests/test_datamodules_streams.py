"""Streams: corrupt data is skipped and counted, ranks/workers read disjoint shards, validation pads evenly."""

from __future__ import annotations

import logging
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.shard_format import encode_sample
from datamodules.shard_writer import ShardWriter
from datamodules.streams import PAD_KEY, TrainStream, ValidationStream, shards_for


def tiny(index: int) -> dict:
    """A distinct 8x8 sample whose depth encodes its index."""
    depth = np.linspace(1.0, 2.0, 64, dtype=np.float32).reshape(8, 8) + index
    rgb = np.full((8, 8, 3), index, np.uint8)
    return encode_sample(f"s{index}", rgb, depth, np.ones((8, 8), bool), meta={"source": "t"})


def write_shards(folder, count: int, per_shard: int = 2, prefix: str = "train") -> list[str]:
    with ShardWriter(folder, prefix, per_shard) as writer:
        for index in range(count):
            writer.write(tiny(index))
    return [str(p) for p in writer.written]


def keys_read(stream, batches: int) -> set[str]:
    return {key for batch in islice(iter(stream), batches) for key in batch["key"]}


def test_shards_split_by_rank_first_then_by_worker():
    shards = [f"s{i}.tar" for i in range(8)]
    rank0, rank1 = set(shards_for(shards, 0, 2, 0, 1)), set(shards_for(shards, 1, 2, 0, 1))
    assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == set(shards)
    w0, w1 = shards_for(shards, 0, 2, 0, 2), shards_for(shards, 0, 2, 1, 2)
    assert set(w0) | set(w1) == rank0 and not set(w0) & set(w1)
    assert shards_for(shards[:2], 0, 2, 1, 3) == ["s0.tar"]  # fewer shards than workers: share the rank's
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        shards_for(shards[:3], 0, 4, 0, 1)


def test_two_ranks_read_disjoint_samples(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, 8)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = TrainStream(shards, batch_size=2, shuffle_buffer=4)
        seen[rank] = keys_read(stream, 20)
        names = {s.rsplit("/", 1)[-1] for s in stream.assignment(rank, 2)}
        assert names == {f"train-{i:06d}.tar" for i in range(rank, 4, 2)}
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"s{i}" for i in range(8)}


def test_train_batches_follow_the_contract_and_flip(tmp_path):
    stream = TrainStream(write_shards(tmp_path, 4), batch_size=3, shuffle_buffer=1, hflip_prob=1.0)
    batch = next(iter(stream))
    assert batch["rgb"].shape == (3, 3, 8, 8) and batch["mask"].dtype == torch.bool
    assert batch["source"] == ["t"] * 3 and all(isinstance(k, str) for k in batch["key"])
    assert (batch["depth"][:, 0, 0, 0] > batch["depth"][:, 0, 0, -1]).all()  # depth grew left-to-right before the flip


def test_seed_offset_changes_the_order(tmp_path):
    shards = write_shards(tmp_path, 8)
    order = lambda s: [k for b in islice(iter(s), 4) for k in b["key"]]  # noqa: E731
    stream = TrainStream(shards, batch_size=2, shuffle_buffer=4)
    first = order(stream)
    assert order(stream) == first  # deterministic
    stream.set_epoch(1)
    assert order(stream) != first


def test_corrupt_shards_are_skipped_and_counted(tmp_path, caplog):
    good = write_shards(tmp_path, 4)
    truncated = tmp_path / "train-bad1.tar"
    truncated.write_bytes(open(good[0], "rb").read()[:1500])
    garbage = tmp_path / "train-bad2.tar"
    garbage.write_bytes(b"not a tar file at all" * 50)
    stream = TrainStream(good + [str(truncated), str(garbage)], batch_size=2, shuffle_buffer=1, hflip_prob=0.0)
    with caplog.at_level(logging.WARNING):
        keys = keys_read(stream, 12)
    assert keys == {f"s{i}" for i in range(4)}
    assert "training stream: skipped shard" in caplog.text and "train-bad2.tar [unreadable_shard" in caplog.text


def test_nothing_readable_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(RuntimeError, match="read errors in a row"):
        next(iter(TrainStream([str(bad)], batch_size=1)))


def val_samples(stream: ValidationStream, rank: int, world: int, worker: int = 0, workers: int = 1) -> list:
    return list(stream._padded(rank, world, worker, workers))


def test_validation_padding_gives_equal_counts_and_no_duplicates(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, 5, prefix="val")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = list(ValidationStream(shards, batch_size=2))
        assert [len(b["key"]) for b in batches] == [2, 1]  # same batch count on both ranks
        samples = [(key, batch["mask"][i]) for batch in batches for i, key in enumerate(batch["key"])]
        seen += [key for key, _ in samples if key != PAD_KEY]
        assert all(not mask.any() for key, mask in samples if key == PAD_KEY)
    assert sorted(seen) == [f"s{i}" for i in range(5)]


def test_validation_splits_over_workers_without_losing_or_repeating(tmp_path):
    stream = ValidationStream(write_shards(tmp_path, 7, prefix="val"), batch_size=2)
    for rank in (0, 1):
        per_worker = [val_samples(stream, rank, 2, worker, 3) for worker in range(3)]
        assert sum(len(s) for s in per_worker) == 4  # ceil(7 / 2) on every rank
        real = sorted(s["key"] for samples in per_worker for s in samples if s["key"] != PAD_KEY)
        assert real == sorted(f"s{i}" for i in range(rank, 7, 2))
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    assert sorted(k for b in loader for k in b["key"]) == sorted(f"s{i}" for i in range(7))


def test_validation_is_identical_on_every_pass_and_skips_bad_samples(tmp_path):
    shards = write_shards(tmp_path, 3, prefix="val")
    (tmp_path / "val-zzz.tar").write_bytes(b"garbage" * 100)
    stream = ValidationStream(shards + [str(tmp_path / "val-zzz.tar")], batch_size=2)
    first, second = list(stream), list(stream)
    assert [b["key"] for b in first] == [b["key"] for b in second] == [["s0", "s1"], ["s2"]]
    assert all(torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["mask"], b["mask"]) for a, b in zip(first, second))
    assert stream.skipped == 1
