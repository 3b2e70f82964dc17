"""Synthetic shard cache and the DataModule: batch contract, shard patterns, resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from datamodules.datamodule import ShardDataModule, expand_shards
from datamodules.synthetic import SyntheticSpec, ensure_synthetic, generate_synthetic_shards
from datamodules.targets import SKIP_REASONS


def test_synthetic_shards_are_written_once_and_resumed(tmp_path):
    shards = generate_synthetic_shards(tmp_path, 6, 32, 48, seed=0, samples_per_shard=4, split_name="train")
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == [p.name for p in shards]
    stamp = shards[0].stat().st_mtime_ns
    (tmp_path / "manifest.json").unlink()  # as if interrupted before the manifest: finished shards are kept
    shards[1].unlink()
    assert generate_synthetic_shards(tmp_path, 6, 32, 48, 0, 4, "train") == shards
    assert shards[0].stat().st_mtime_ns == stamp and shards[1].is_file()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="holds synthetic data"):
        generate_synthetic_shards(tmp_path, 7, 32, 48, 0, 4, "train")


def test_spec_default_folder_depends_on_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("DGFT_CACHE", str(tmp_path))
    a, b = SyntheticSpec(seed=0).folder(), SyntheticSpec(seed=1).folder()
    assert a.parent == tmp_path / "synthetic" and a != b and SyntheticSpec(seed=0).folder() == a


def test_datamodule_batches_follow_the_contract(tmp_path):
    spec = SyntheticSpec(num_train=8, num_val=3, height=32, width=48, samples_per_shard=4, cache_dir=str(tmp_path))
    dm = ShardDataModule(batch_size=2, num_workers=0, synthetic=spec)
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    batch = next(iter(dm.train_dataloader()))
    shapes = {"rgb": 3, "depth": 1, "depth_target": 1, "depth_norm": 1, "normals": 3, "mask": 1}
    for key, channels in shapes.items():
        assert batch[key].shape == (2, channels, 32, 48), key
        assert batch[key].dtype == (torch.bool if key == "mask" else torch.float32), key
    assert -1 <= batch["rgb"].min() and batch["rgb"].max() <= 1
    assert -1 <= batch["depth_norm"].min() and batch["depth_norm"].max() <= 1
    mask = batch["mask"]
    assert mask.any() and (batch["depth"][mask] > 0).all() and (batch["depth"][~mask] == 0).all()
    lengths = batch["normals"].norm(dim=1, keepdim=True)
    assert torch.allclose(lengths[mask], torch.ones(()), atol=1e-4) and (lengths[~mask] == 0).all()
    assert isinstance(batch["key"], list) and batch["source"] == ["synthetic", "synthetic"]
    assert batch["skipped"].shape == (2, len(SKIP_REASONS)) and batch["skipped"].dtype == torch.long
    assert not batch["skipped"].any()  # nothing skipped in whole shards
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 3


def test_resume_starts_a_new_training_order(tmp_path):
    spec = SyntheticSpec(num_train=8, num_val=2, height=16, width=16, samples_per_shard=4, cache_dir=str(tmp_path))
    first = ShardDataModule(batch_size=4, num_workers=0, synthetic=spec)
    resumed = ShardDataModule(batch_size=4, num_workers=0, synthetic=spec)
    resumed.trainer = SimpleNamespace(global_step=40)  # the step a resumed trainer reports
    order = lambda dm: next(iter(dm.train_dataloader()))["key"]  # noqa: E731
    assert order(first) == order(ShardDataModule(batch_size=4, num_workers=0, synthetic=spec))
    assert order(resumed) != order(first) and resumed.stream_start_step == 40
    again = ShardDataModule(batch_size=4, num_workers=0, synthetic=spec)
    again.trainer = SimpleNamespace(global_step=40)
    assert order(again) == order(resumed)  # resuming twice from one checkpoint reads the same order


def test_shard_patterns_expand_and_bad_settings_fail(tmp_path):
    spec = SyntheticSpec(num_train=4, num_val=1, height=8, width=8, samples_per_shard=2, cache_dir=str(tmp_path))
    shards = ensure_synthetic(spec)["train"]
    folder = tmp_path / "train"
    assert expand_shards(str(folder / "train-*.tar")) == shards
    assert expand_shards(str(folder / "train-{000000..000001}.tar")) == shards
    assert expand_shards(shards) == shards
    with pytest.raises(FileNotFoundError, match="no shard file"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="synthetic"):
        ShardDataModule()
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        ShardDataModule(train_shards=shards, batch_size=0)


def test_parallel_generation_writes_the_same_scenes(tmp_path):
    import tarfile

    def members(shards):
        out = {}
        for shard in shards:
            with tarfile.open(shard) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        return out

    serial = generate_synthetic_shards(tmp_path / "a", 6, 32, 48, 0, 2, "train", processes=1)
    parallel = generate_synthetic_shards(tmp_path / "b", 6, 32, 48, 0, 2, "train", processes=2)
    assert [p.name for p in serial] == [p.name for p in parallel]
    assert members(serial) == members(parallel)
