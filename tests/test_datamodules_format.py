"""Shard format: exact round trip, invalid depth, clear errors, atomic shard writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from datamodules.scenes import generate_scene
from datamodules.shard_format import SampleFormatError, decode_sample, encode_sample
from datamodules.shard_writer import ShardWriter


def encoded(seed: int, h: int = 32, w: int = 48) -> dict:
    scene = generate_scene(seed, h, w)
    return encode_sample(f"s{seed}", scene["rgb"], scene["depth"], scene["mask"], scene["normals"], {"source": "t"})


def test_round_trip_keeps_values_and_dtypes():
    scene = generate_scene(3, 32, 48)
    meta = {"source": "synthetic", "domain": "indoor", "intrinsics": [40.0, 40.0, 24.0, 16.0], "seed": 3}
    raw = encode_sample("s3", scene["rgb"], scene["depth"], scene["mask"], scene["normals"], meta)
    decoded = decode_sample(raw)
    assert np.array_equal(decoded["rgb"], scene["rgb"]) and decoded["rgb"].dtype == np.uint8
    assert decoded["depth"].dtype == np.float32 and decoded["mask"].dtype == bool
    assert decoded["normals"].dtype == np.float32 and decoded["key"] == "s3"
    assert np.array_equal(decoded["mask"], scene["mask"])
    np.testing.assert_allclose(decoded["depth"], scene["depth"], atol=0.0005 + 1e-6)  # 1 mm units, rounded
    valid = decoded["mask"]
    assert (decoded["depth"][~valid] == 0).all()
    cosine = (decoded["normals"][valid] * scene["normals"][valid]).sum(-1)
    assert np.degrees(np.arccos(np.clip(cosine, -1, 1))).max() < 0.5  # 8-bit quantisation
    np.testing.assert_allclose(np.linalg.norm(decoded["normals"][valid], axis=-1), 1.0, atol=1e-5)
    assert decoded["meta"] == {**meta, "depth_scale": 0.001, "height": 32, "width": 48}


def test_sixteen_bits_are_kept_exactly_through_a_tar(tmp_path):
    units = np.arange(1, 65536, 1024, dtype=np.int64)[:64].reshape(8, 8)
    units[0, 0] = 65535
    depth = (units * 0.01).astype(np.float32)  # centimetres, up to 655.35 m
    raw = encode_sample("cm", np.zeros((8, 8, 3), np.uint8), depth, np.ones((8, 8), bool), meta={"depth_scale": 0.01})
    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as sink:
        sink.write(raw)
    (read,) = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    decoded = decode_sample(read)
    np.testing.assert_allclose(decoded["depth"], depth, rtol=1e-6)
    assert "normals" not in decoded and decoded["mask"].all()


def test_nan_depth_is_invalid_and_bad_input_is_a_clear_error():
    rgb = np.zeros((8, 8, 3), np.uint8)
    depth = np.full((8, 8), 2.0, np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2] = np.nan, np.inf, -1.0
    decoded = decode_sample(encode_sample("k", rgb, depth, np.ones((8, 8), bool)))
    assert not decoded["mask"][0, :3].any() and decoded["mask"].sum() == 61
    assert (decoded["depth"][0, :3] == 0).all()
    with pytest.raises(SampleFormatError, match="does not fit 16 bits"):
        encode_sample("k", rgb, np.full((8, 8), 70.0, np.float32), np.ones((8, 8), bool))
    with pytest.raises(SampleFormatError, match="without '.'"):
        encode_sample("a.b", rgb, depth, np.ones((8, 8), bool))
    with pytest.raises(SampleFormatError, match="missing members"):
        decode_sample({"__key__": "k", "rgb.png": b""})
    broken = {**encode_sample("k", rgb, depth, np.ones((8, 8), bool)), "rgb.png": b"not a png"}
    with pytest.raises(SampleFormatError, match="cannot decode rgb.png"):
        decode_sample(broken)


def test_shard_writer_rolls_over_and_is_atomic(tmp_path):
    with ShardWriter(tmp_path, "train", samples_per_shard=2) as writer:
        for seed in range(5):
            writer.write(encoded(seed, 8, 8))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples_per_shard"] == [2, 2, 1] and manifest["shards"] == names[1:]
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False)]
    assert keys == [f"s{i}" for i in range(5)]

    with pytest.raises(RuntimeError, match="stop"):
        with ShardWriter(tmp_path / "b", "val", samples_per_shard=2) as writer:
            writer.write(encoded(0, 8, 8))
            raise RuntimeError("stop")
    assert list((tmp_path / "b").iterdir()) == []  # the unfinished shard is gone, no partial .tar
