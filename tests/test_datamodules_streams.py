"""Streams: corrupt data is skipped and counted, ranks/workers read disjoint shards, validation pads evenly and
reads each shard once (a simulation of world 1..3 x workers 1..3 with damaged shards)."""

from __future__ import annotations

import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import streams
from datamodules.shard_format import encode_sample, expected_samples, header_sample_count, sample_count
from datamodules.shard_writer import ShardWriter, update_manifest
from datamodules.streams import (
    PAD_KEY,
    TrainStream,
    ValidationStream,
    batches,
    plan_validation,
    read_shard,
    shards_for,
)
from datamodules.targets import SKIP_REASONS, skip_totals


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


def with_normals(index: int, corrupt: bool = False) -> dict:
    """`tiny(index)` with normals facing the camera (or an undecodable normals.png)."""
    normals = np.zeros((8, 8, 3), np.float32)
    normals[..., 2] = 1
    raw = encode_sample(f"n{index}", np.full((8, 8, 3), index, np.uint8), np.linspace(1, 2, 64, dtype=np.float32).reshape(8, 8) + index,
                        np.ones((8, 8), bool), normals, meta={"source": "t"})  # fmt: skip
    if corrupt:
        raw["normals.png"] = b"not a png"
    return raw


@pytest.mark.parametrize("stream_kind", ["train", "validation"])
def test_normals_are_decoded_only_when_asked(tmp_path, stream_kind):
    with ShardWriter(tmp_path, "train", 2) as writer:
        for index in range(4):
            writer.write(with_normals(index, corrupt=index == 3))
    shards = [str(p) for p in writer.written]

    def batch_of(decode_normals: bool) -> dict:
        if stream_kind == "train":
            stream = TrainStream(shards[:1], 2, shuffle_buffer=1, hflip_prob=0.0, decode_normals=decode_normals)
        else:
            stream = ValidationStream(shards, 4, decode_normals=decode_normals)
        return next(iter(stream))

    decoded, skipped = batch_of(True), batch_of(False)
    assert torch.allclose(decoded["normals"][:2, 2], torch.ones(1), atol=1e-4)
    assert "normals" not in skipped  # a depth run ships no planes of zeros
    for key in ("rgb", "depth", "depth_target", "mask"):
        assert torch.equal(decoded[key][:2], skipped[key][:2]), key
    if stream_kind == "validation":  # the corrupt normals.png: a counted skip only when it is decoded
        assert decoded["key"] == ["n0", "n1", "n2", PAD_KEY] and skip_totals(decoded["skipped"]) == {"bad_image": 1}
        assert skipped["key"] == ["n0", "n1", "n2", "n3"] and not skipped["skipped"].any()


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
    stream = ValidationStream(write_shards(tmp_path, 7, prefix="val"), batch_size=2)  # shards of 2, 2, 2, 1
    seen = []
    for rank in (0, 1):
        per_worker = [val_samples(stream, rank, 2, worker, 3) for worker in range(3)]
        assert [len(s) for s in per_worker] == [2, 2, 0]  # the same per worker index on every rank
        seen += [s["key"] for samples in per_worker for s in samples if s["key"] != PAD_KEY]
    assert sorted(seen) == sorted(f"s{i}" for i in range(7))
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


# ------------------------------------------------------------------------------------- shard-level validation
def test_the_plan_gives_every_shard_to_one_slot_and_balances_the_ranks():
    counts = [64] * 10 + [14, 0]
    plan = plan_validation(counts, world=4, workers=2)
    owners = [(r, w) for r in range(4) for w in range(2) for _ in plan.slots[r][w]]
    shards = sorted(i for r in range(4) for w in range(2) for i in plan.slots[r][w])
    assert shards == list(range(12)) and len(owners) == 12  # each shard once
    loads = [sum(plan.load(r, w) for w in range(2)) for r in range(4)]
    assert sorted(loads) == [128, 142, 192, 192] and sum(loads) == 654  # within one shard of each other
    assert plan.quotas == tuple(max(plan.load(r, w) for r in range(4)) for w in range(2))
    assert plan == plan_validation(counts, 4, 2)  # the same on every rank and worker
    (empty,) = [(r, w) for r in range(4) for w in range(2) if 11 in plan.slots[r][w]]
    assert plan.load(*empty) == max(plan.load(r, w) for r in range(4) for w in range(2))  # carries its skips
    first = plan_validation([3, 3, 3, 1], world=2, workers=1, max_samples=5)
    assert first.take == (3, 2, 0, 0) and first.cut == (False, True, True, True)
    assert first.read == (True, True, False, False) and first.quotas == (3,) and first.batches(2) == 2


def write_range(folder, prefix: str, indices, per_shard: int, manifest: bool = True) -> list[str]:
    with ShardWriter(folder, prefix, per_shard, manifest=manifest) as writer:
        for index in indices:
            writer.write(tiny(index) if index != 7 else {**tiny(7), "rgb.png": b"junk"})
    return [str(p) for p in writer.written]


@pytest.fixture
def damaged_set(tmp_path):
    """Eleven samples in shards of 3, 3, 3, 2 (s4 of the second cut, so s4 and s5 are lost: 2 truncated_shard per
    the manifest; s7 undecodable: 1 bad_image), an empty tar listed with 0 samples, a shard without a manifest
    entry (counted from its headers: s20, s21) and one with a sample more than its manifest lists (s32: capped, 1
    bad_sample)."""
    folder = tmp_path / "set"
    shards = write_range(folder, "val", range(11), 3)
    with tarfile.open(shards[1]) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "s4.depth.png").offset_data + 10
    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[:cut_at])
    empty = folder / "val-000009.tar"
    tarfile.open(empty, "w").close()
    update_manifest(folder, {empty.name: 0})
    unlisted = write_range(folder, "vam", [20, 21], 3, manifest=False)
    extra = write_range(folder, "vax", [30, 31, 32], 3)
    update_manifest(folder, {Path(extra[0]).name: 2})
    real = {f"s{i}" for i in [0, 1, 2, 3, 6, 8, 9, 10, 20, 21, 30, 31]}
    skips = {"truncated_shard": 2, "bad_image": 1, "bad_sample": 1}
    return [*shards, str(empty), *unlisted, *extra], real, skips


def dataloader_order(per_worker: list[list[dict]]) -> list[dict]:
    """The batches of a DataLoader's workers as it yields them: one from each worker in turn, skipping finished ones."""
    queues, order = [list(batches) for batches in per_worker], []
    while any(queues):
        order += [queue.pop(0) for queue in queues if queue]
    return order


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_rank_and_worker_reads_its_own_shards_once_and_counts_exactly(
    damaged_set, tmp_path, monkeypatch, world, workers
):
    shards, real, expected_skips = damaged_set
    opened = []
    monkeypatch.setattr(streams, "read_shard", lambda url, *a, **k: opened.append(url) or read_shard(url, *a, **k))
    monkeypatch.setenv("DGFT_SHARD_LOG", str(tmp_path / f"log-{world}-{workers}.jsonl"))
    stream = ValidationStream(shards, batch_size=2)
    assert stream.sample_counts() == [3, 3, 3, 2, 0, 2, 2]  # manifest, else headers (vam-000000.tar)
    keys, skipped, layouts = [], torch.zeros(len(SKIP_REASONS), dtype=torch.long), set()
    for rank in range(world):
        per_worker = [list(batches(val_samples(stream, rank, world, w, workers), 2, False)) for w in range(workers)]
        order = dataloader_order(per_worker)
        layouts.add(tuple(len(batch["key"]) for batch in order))  # batch count and sizes
        for batch in order:
            skipped += batch["skipped"].sum(0)
            for key, mask in zip(batch["key"], batch["mask"]):
                assert key != PAD_KEY or not mask.any()
                keys += [key] if key != PAD_KEY else []
    assert len(layouts) == 1  # every rank yields the same batches
    assert sorted(keys) == sorted(real)  # every real sample exactly once
    assert skip_totals(skipped) == expected_skips
    assert sorted(opened) == sorted(shards)  # each shard read by exactly one slot
    records = [json.loads(line) for line in (tmp_path / f"log-{world}-{workers}.jsonl").read_text().splitlines()]
    assert {(r["rank"], r["worker"]) for r in records} == {(r, w) for r in range(world) for w in range(workers)}
    assert {r["split_by"] for r in records} == {"shard"}
    assert sorted(s for r in records for s in r["shards"]) == sorted(shards)


def test_a_real_dataloader_with_two_ranks_of_two_workers(damaged_set, monkeypatch):
    shards, real, expected_skips = damaged_set
    keys, skipped, lengths = [], torch.zeros(len(SKIP_REASONS), dtype=torch.long), set()
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = list(DataLoader(ValidationStream(shards, batch_size=2), batch_size=None, num_workers=2))
        lengths.add(tuple(len(b["key"]) for b in loader))
        keys += [k for b in loader for k in b["key"] if k != PAD_KEY]
        skipped += sum(b["skipped"].sum(0) for b in loader)
    assert len(lengths) == 1 and sorted(keys) == sorted(real) and skip_totals(skipped) == expected_skips


def test_the_first_n_samples_come_from_the_counts_and_stop_reading(tmp_path, caplog):
    shards = write_range(tmp_path, "val", range(9), 3)
    with tarfile.open(shards[1]) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "s5.depth.png").offset_data + 10
    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[:cut_at])  # s5 lost (s4 whole)
    with caplog.at_level(logging.WARNING):
        samples = val_samples(ValidationStream(shards, batch_size=2, max_samples=5), 0, 1)
    # s0..s4 are the first 5: s3, s4 read, nothing after them counted lost; shard 3 not opened
    assert [s["key"] for s in samples] == ["s0", "s1", "s2", "s3", "s4"]
    assert not skip_totals(sum(s["skipped"] for s in samples))
    samples = val_samples(ValidationStream(shards, batch_size=2, max_samples=6), 0, 1)
    assert [s["key"] for s in samples] == ["s0", "s1", "s2", "s3", "s4", PAD_KEY]  # s5 lost, not replaced by s6
    assert skip_totals(sum(s["skipped"] for s in samples)) == {"truncated_shard": 1}


def test_a_set_without_any_sample_is_a_clear_error_on_every_slot(tmp_path):
    garbage = tmp_path / "val-000000.tar"
    garbage.write_bytes(b"garbage" * 100)
    stream = ValidationStream([str(garbage)], batch_size=2)
    for rank, worker in [(0, 0), (1, 0), (1, 1)]:
        with pytest.raises(RuntimeError, match="no readable validation samples in 1 shards"):
            val_samples(stream, rank, 2, worker, 2)


def test_header_counts_match_what_webdataset_reads(tmp_path):
    shards = write_range(tmp_path, "val", range(5), 2, manifest=False)
    assert [header_sample_count(s) for s in shards] == [2, 2, 1]
    assert header_sample_count(tmp_path / "missing.tar") == 0 and header_sample_count("pipe:cat x.tar") is None
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    assert header_sample_count(tmp_path / "bad.tar") == 0 and sample_count(tmp_path / "bad.tar") == 0
    assert ValidationStream(["http://host/a.tar"], 1).sample_counts() is None  # split by sample


def test_the_shard_writer_merges_its_counts_into_the_folder_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "x", "shards": ["old.tar"], "samples_per_shard":
                                                        [7], "written": 7}))  # fmt: skip
    write_range(tmp_path, "val", range(5), 2)
    write_range(tmp_path, "test", range(3), 2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dataset"] == "x" and manifest["written"] == 15
    assert dict(zip(manifest["shards"], manifest["samples_per_shard"])) == {
        "old.tar": 7, "val-000000.tar": 2, "val-000001.tar": 2, "val-000002.tar": 1, "test-000000.tar": 2,
        "test-000001.tar": 1,
    }  # fmt: skip
    assert [expected_samples(tmp_path / f"val-00000{i}.tar") for i in range(3)] == [2, 2, 1]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="stop"), ShardWriter(tmp_path / "b", "val", 2) as writer:
        for index in range(3):
            writer.write(tiny(index))
        raise RuntimeError("stop")
    assert json.loads((tmp_path / "b/manifest.json").read_text())["samples_per_shard"] == [2]  # the finished one
    synthetic = tmp_path / "syn"
    synthetic.mkdir()
    params = {"samples_per_shard": 4, "num_samples": 6}
    (synthetic / "manifest.json").write_text(json.dumps({"params": params, "shards": ["a.tar", "b.tar"]}))
    update_manifest(synthetic, {"c.tar": 1})
    manifest = json.loads((synthetic / "manifest.json").read_text())
    assert manifest["params"] == params and manifest["samples_per_shard"] == [4, 2, 1]
