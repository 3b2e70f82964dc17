"""Shard format round trip, target construction, flips, corrupt data, rank/worker splits, validation padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.datamodule import ShardDataModule, expand_shards
from datamodules.scenes import generate_scene
from datamodules.shard_format import SampleFormatError, decode_sample, encode_sample
from datamodules.shard_writer import AtomicShardWriter
from datamodules.streams import PAD_KEY, TrainStream, ValidationStream, shards_for
from datamodules.synthetic import SyntheticSpec, ensure_synthetic
from datamodules.targets import build_targets, hflip


def scene_sample(seed: int = 0, h: int = 32, w: int = 48) -> dict:
    scene = generate_scene(seed, h, w)
    return encode_sample(f"s{seed}", scene["rgb"], scene["depth"], scene["mask"], scene["normals"], {"source": "t"})


def write_shards(folder, count: int, per_shard: int = 2, prefix: str = "train") -> list[str]:
    writer = AtomicShardWriter(folder, prefix)
    return [
        str(writer.write(i, (scene_sample(seed) for seed in range(start, min(start + per_shard, count)))))
        for i, start in enumerate(range(0, count, per_shard))
    ]


def test_round_trip_keeps_values_and_dtypes():
    scene = generate_scene(3, 32, 48)
    decoded = decode_sample(scene_sample(3))
    assert np.array_equal(decoded["rgb"], scene["rgb"]) and decoded["rgb"].dtype == np.uint8
    assert decoded["depth"].dtype == np.float32 and decoded["mask"].dtype == bool
    assert np.array_equal(decoded["mask"], scene["mask"])
    np.testing.assert_allclose(decoded["depth"], scene["depth"], atol=0.0005 + 1e-6)  # 1 mm units, rounded
    valid = decoded["mask"]
    cosine = (decoded["normals"][valid] * scene["normals"][valid]).sum(-1)
    assert np.degrees(np.arccos(np.clip(cosine, -1, 1))).max() < 0.5  # 8-bit quantisation
    assert decoded["meta"]["source"] == "t" and decoded["meta"]["height"] == 32


def test_nan_depth_is_invalid_and_out_of_range_depth_is_an_error():
    rgb = np.zeros((8, 8, 3), np.uint8)
    depth = np.full((8, 8), 2.0, np.float32)
    depth[0, 0] = np.nan
    decoded = decode_sample(encode_sample("k", rgb, depth, np.ones((8, 8), bool)))
    assert not decoded["mask"][0, 0] and decoded["mask"].sum() == 63
    with pytest.raises(SampleFormatError, match="does not fit 16 bits"):
        encode_sample("k", rgb, np.full((8, 8), 70.0, np.float32), np.ones((8, 8), bool))
    with pytest.raises(SampleFormatError, match="missing members"):
        decode_sample({"__key__": "k", "rgb.png": b""})


def test_targets_on_a_hand_built_case():
    depth = np.linspace(1.0, 10.0, 64, dtype=np.float32).reshape(8, 8)
    mask = np.ones((8, 8), bool)
    mask[0, :2] = False
    sample = {"key": "k", "rgb": np.full((8, 8, 3), 255, np.uint8), "depth": depth, "mask": mask, "meta": {}}
    out = build_targets(sample)
    valid = torch.from_numpy(depth[mask])
    q2, q98 = torch.quantile(valid, 0.02), torch.quantile(valid, 0.98)
    assert out["rgb"].min() == 1.0 and out["mask"].shape == (1, 8, 8)
    assert out["depth"][0, 0, 0] == 0 and out["depth"][0, 7, 7] == pytest.approx(10.0)  # raw, for metrics
    assert out["depth_target"][0, 0, 0] == pytest.approx(q98.item())  # invalid -> far
    assert out["depth_target"].max() == pytest.approx(q98.item()) and out["depth_target"].min() == pytest.approx(q2.item())
    assert out["depth_norm"].min() == -1.0 and out["depth_norm"].max() == 1.0


def test_constant_or_empty_depth_empties_the_mask_without_nan():
    base = {"key": "k", "rgb": np.zeros((8, 8, 3), np.uint8), "meta": {}}
    for depth, mask in [(np.full((8, 8), 3.0, np.float32), np.ones((8, 8), bool)), (np.zeros((8, 8), np.float32), np.zeros((8, 8), bool))]:
        out = build_targets({**base, "depth": depth, "mask": mask})
        assert not out["mask"].any()
        assert all(torch.isfinite(out[k]).all() for k in ("depth", "depth_target", "depth_norm", "normals"))


def test_odd_sizes_are_a_clear_error():
    sample = {"key": "odd", "rgb": np.zeros((10, 8, 3), np.uint8), "depth": np.ones((10, 8), np.float32), "mask": np.ones((10, 8), bool)}
    with pytest.raises(ValueError, match="odd: image size 10x8 is not a multiple of 8"):
        build_targets(sample)


def test_hflip_mirrors_rasters_and_negates_normal_x():
    sample = build_targets(decode_sample(scene_sample(1)))
    flipped = hflip(sample)
    assert torch.equal(flipped["rgb"], sample["rgb"].flip(-1))
    assert torch.equal(flipped["mask"], sample["mask"].flip(-1))
    assert torch.equal(flipped["normals"][0], -sample["normals"][0].flip(-1))
    assert torch.equal(flipped["normals"][1:], sample["normals"][1:].flip(-1))


def test_ranks_read_disjoint_shards_and_workers_split_them():
    shards = [f"s{i}.tar" for i in range(8)]
    rank0 = set(shards_for(shards, 0, 2, 0, 1))
    rank1 = set(shards_for(shards, 1, 2, 0, 1))
    assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == set(shards)
    w0, w1 = shards_for(shards, 0, 2, 0, 2), shards_for(shards, 0, 2, 1, 2)
    assert set(w0) | set(w1) == rank0 and not set(w0) & set(w1)
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        shards_for(shards[:3], 0, 4, 0, 1)


def test_train_stream_skips_corrupt_shards_and_counts_them(tmp_path, caplog):
    good = write_shards(tmp_path, 4)
    truncated = tmp_path / "train-bad1.tar"
    truncated.write_bytes(open(good[0], "rb").read()[:1500])
    garbage = tmp_path / "train-bad2.tar"
    garbage.write_bytes(b"not a tar file at all" * 50)
    stream = TrainStream(good + [str(truncated), str(garbage)], batch_size=2, shuffle_buffer=1, hflip_prob=0.0)
    iterator = iter(stream)
    keys = {key for _ in range(12) for key in next(iterator)["key"]}
    assert keys <= {f"s{i}" for i in range(4)} and len(keys) >= 3
    assert "skipped unreadable data" in caplog.text


def test_train_stream_fails_clearly_when_nothing_is_readable(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(RuntimeError, match="read errors in a row"):
        next(iter(TrainStream([str(bad)], batch_size=1)))


def test_validation_padding_gives_equal_counts_and_no_duplicates(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, 5, prefix="val")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = list(ValidationStream(shards, batch_size=2))
        samples = [(key, batch["mask"][i]) for batch in batches for i, key in enumerate(batch["key"])]
        assert len(samples) == 3
        seen += [key for key, _ in samples if key != PAD_KEY]
        pads = [mask for key, mask in samples if key == PAD_KEY]
        assert all(not m.any() for m in pads)
    assert sorted(seen) == [f"s{i}" for i in range(5)]


def test_validation_is_identical_on_every_pass(tmp_path):
    stream = ValidationStream(write_shards(tmp_path, 3, prefix="val"), batch_size=2)
    first, second = list(stream), list(stream)
    assert [b["key"] for b in first] == [b["key"] for b in second]
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(first, second))


def test_synthetic_cache_is_generated_once_and_resumed(tmp_path):
    spec = SyntheticSpec(num_train=6, num_val=2, height=32, width=48, samples_per_shard=4, cache_dir=str(tmp_path))
    shards = ensure_synthetic(spec)
    assert len(shards["train"]) == 2 and len(shards["val"]) == 1
    stamp = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    (tmp_path / "manifest.json").unlink()  # as if interrupted before the manifest: finished shards are kept
    assert ensure_synthetic(spec) == shards
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == stamp


def test_datamodule_batches_follow_the_contract(tmp_path):
    spec = SyntheticSpec(num_train=8, num_val=3, height=32, width=48, samples_per_shard=4, cache_dir=str(tmp_path))
    dm = ShardDataModule(batch_size=2, num_workers=0, synthetic=spec)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    shapes = {"rgb": 3, "depth": 1, "depth_target": 1, "depth_norm": 1, "normals": 3, "mask": 1}
    for key, channels in shapes.items():
        assert batch[key].shape == (2, channels, 32, 48), key
    assert batch["mask"].dtype == torch.bool and batch["rgb"].dtype == torch.float32
    assert -1 <= batch["rgb"].min() and batch["rgb"].max() <= 1
    assert isinstance(batch["key"], list) and batch["source"] == ["synthetic", "synthetic"]
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 3


def test_shard_patterns_expand_and_missing_ones_fail(tmp_path):
    shards = write_shards(tmp_path, 4)
    assert expand_shards(str(tmp_path / "train-*.tar")) == shards
    assert expand_shards(str(tmp_path / "train-{000000..000001}.tar")) == shards
    with pytest.raises(FileNotFoundError, match="no shard file"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="synthetic"):
        ShardDataModule()
