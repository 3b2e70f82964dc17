"""Evaluation data: fixed validation subsets, separate test shards under a shard root, any image size."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from datamodules.datamodule import ShardDataModule
from datamodules.shard_format import encode_sample
from datamodules.shard_writer import ShardWriter
from datamodules.streams import PAD_KEY, TrainStream, ValidationStream


def write_set(folder, prefix: str, count: int, height: int = 8, width: int = 8) -> list[str]:
    depth = np.linspace(1.0, 2.0, height * width, dtype=np.float32).reshape(height, width)
    with ShardWriter(folder, prefix, 3) as writer:
        for i in range(count):
            rgb = np.full((height, width, 3), i, np.uint8)
            writer.write(encode_sample(f"{prefix}{i}", rgb, depth + i, np.ones((height, width), bool)))
    return [str(p) for p in writer.written]


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_validation_subset_first_n_is_split_over_ranks_without_repeats(tmp_path, monkeypatch):
    shards = write_set(tmp_path, "val", 10)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys = keys_of(ValidationStream(shards, batch_size=2, max_samples=5))
        assert len(keys) == 3  # ceil(5 / 2) slots on every rank
        seen += [k for k in keys if k != PAD_KEY]
    assert sorted(seen) == [f"val{i}" for i in range(5)]  # the first 5 in shard order, each once


def test_validation_subset_by_keys_from_a_list_or_a_file(tmp_path, caplog):
    write_set(tmp_path / "val", "val", 7)
    listing = tmp_path / "subset.txt"
    listing.write_text("# NYU-style subset\nval5\n\nval1\nval9\n")
    dm = ShardDataModule(val_shards="val/val-*.tar", shard_root=str(tmp_path), val_keys=str(listing), num_workers=0)
    with caplog.at_level(logging.WARNING):
        assert keys_of(dm.val_dataloader()) == ["val1", "val5"]
    assert "1 selected validation keys are not in the shards" in caplog.text
    dm = ShardDataModule(val_shards="val/val-*.tar", shard_root=str(tmp_path), val_keys=["val6", "val0", "val3"],
                         val_max_samples=2, num_workers=0)  # fmt: skip
    assert keys_of(dm.val_dataloader()) == ["val0", "val3"]
    dm = ShardDataModule(val_shards="val/val-*.tar", shard_root=str(tmp_path), val_keys=["nope"], num_workers=0)
    with pytest.raises(RuntimeError, match="no readable validation samples with the selected keys"):
        keys_of(dm.val_dataloader())


def test_test_shards_are_read_completely_and_default_to_validation(tmp_path):
    write_set(tmp_path / "a", "val", 4)
    write_set(tmp_path / "b", "test", 5)
    dm = ShardDataModule(
        val_shards="a/val-*.tar", test_shards="b/test-*.tar", shard_root=str(tmp_path), val_max_samples=2,
        val_batch_size=2, num_workers=0,
    )  # fmt: skip
    assert keys_of(dm.val_dataloader()) == ["val0", "val1"]
    assert keys_of(dm.test_dataloader()) == [f"test{i}" for i in range(5)]  # no subset for test
    assert keys_of(dm.predict_dataloader()) == keys_of(dm.test_dataloader())
    only_val = ShardDataModule(val_shards=str(tmp_path / "a" / "val-*.tar"), num_workers=0)  # absolute: no root
    assert keys_of(only_val.test_dataloader()) == [f"val{i}" for i in range(4)]
    with pytest.raises(ValueError, match="val_max_samples"):
        ShardDataModule(val_shards="x", val_max_samples=0)


def test_evaluation_samples_need_not_be_multiples_of_eight(tmp_path):
    shards = write_set(tmp_path, "test", 2, height=20, width=28)  # e.g. Sintel's 436 rows
    batch = next(iter(ValidationStream(shards, batch_size=2)))
    assert batch["rgb"].shape == (2, 3, 20, 28) and batch["mask"].all()
    # training still needs VAE-compatible sizes: each such sample is a counted skip, all of them a clear stop
    with pytest.raises(RuntimeError, match=r"read errors in a row .*\[bad_size\].* not a multiple of 8"):
        next(iter(TrainStream(shards, batch_size=1)))
