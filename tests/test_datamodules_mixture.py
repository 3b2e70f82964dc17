"""Several training sources: seeded per-micro-batch source choice, no mixed batches, rank/worker splits."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.datamodule import ShardDataModule
from datamodules.mixture import MixedTrainStream, TrainSource
from datamodules.shard_format import encode_sample
from datamodules.shard_writer import ShardWriter
from datamodules.streams import TrainStream
from experiments.__main__ import main
from tests.helpers import ROOT

SIZES = {"hypersim": (8, 8), "vkitti2": (8, 16)}  # different resolutions, as in the real mixture


def write_source(folder, name: str, count: int, per_shard: int = 2) -> list[str]:
    """`count` samples of source `name` at its size; depth grows left to right, normals face image-left."""
    height, width = SIZES[name]
    depth = np.tile(np.linspace(1.0, 2.0, width, dtype=np.float32), (height, 1))
    normals = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (height, width, 1))
    with ShardWriter(folder / name, "train", per_shard) as writer:
        for i in range(count):
            rgb = np.full((height, width, 3), i, np.uint8)
            mask = np.ones((height, width), bool)
            writer.write(encode_sample(f"{name}{i}", rgb, depth + i, mask, normals, meta={"source": name}))
    return [str(p) for p in writer.written]


def mixture(tmp_path, probabilities=(0.9, 0.1), seed=0, count=8, **stream_args) -> MixedTrainStream:
    streams = {
        name: TrainStream(write_source(tmp_path, name, count), batch_size=2, shuffle_buffer=4, **stream_args)
        for name in SIZES
    }
    return MixedTrainStream(streams, dict(zip(SIZES, probabilities)), seed=seed)


def test_sources_follow_their_probabilities_and_never_mix(tmp_path):
    stream = mixture(tmp_path, hflip_prob=0.0)
    # The draws: Binomial(20000, 0.1) has standard deviation 0.0021; 0.008 is almost four of them.
    draws = Counter(stream.source_sequence(20_000))
    assert draws["vkitti2"] / 20_000 == pytest.approx(0.1, abs=0.008)
    # The stream follows exactly those draws, and every micro-batch is one source at its own size.
    realized = []
    for batch in islice(iter(stream), 300):
        (source,) = set(batch["source"])
        assert batch["rgb"].shape[-2:] == SIZES[source]
        assert all(key.startswith(source) for key in batch["key"])
        realized.append(source)
    assert realized == stream.source_sequence(300)
    assert realized.count("vkitti2") / 300 == pytest.approx(0.1, abs=0.06)  # sd 0.017


def test_source_choice_is_seeded_and_reproducible(tmp_path):
    stream = mixture(tmp_path, probabilities=(1.0, 1.0))  # weights are normalised: 0.5 / 0.5
    assert stream.probabilities == [0.5, 0.5]
    sequence = lambda s: [b["source"][0] for b in islice(iter(s), 40)]  # noqa: E731
    first = sequence(stream)
    assert sequence(stream) == first == stream.source_sequence(40)
    assert len(set(first)) == 2
    stream.set_epoch(3)  # a resumed stream draws a new sequence, reproducibly
    assert sequence(stream) != first and sequence(stream) == stream.source_sequence(40)
    assert stream.source_sequence(40, rank=1) != stream.source_sequence(40, rank=0)


def test_flip_and_targets_are_applied_per_source(tmp_path):
    stream = mixture(tmp_path, probabilities=(0.5, 0.5), hflip_prob=1.0)
    for batch in islice(iter(stream), 6):
        assert (batch["depth"][:, 0, 0, 0] > batch["depth"][:, 0, 0, -1]).all()  # grew left to right unflipped
        n_x = batch["normals"][:, 0]  # +1 before the flip; 8-bit quantisation leaves 1.5e-5
        torch.testing.assert_close(n_x, torch.full_like(n_x, -1.0), atol=1e-4, rtol=0)
        assert batch["depth_target"].shape == batch["depth"].shape and batch["mask"].all()


def test_ranks_and_workers_read_disjoint_shards_of_every_source(tmp_path, monkeypatch):
    log = tmp_path / "shards.jsonl"
    monkeypatch.setenv("DGFT_SHARD_LOG", str(log))
    stream = mixture(tmp_path, probabilities=(0.5, 0.5), count=16)  # 8 shards per source
    keys = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        keys[rank] = {k for batch in islice(iter(loader), 60) for k in batch["key"]}
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert {k[:7] for k in keys[0]} == {k[:7] for k in keys[1]} == {"hypersi", "vkitti2"}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for name in SIZES:
        owners = [(r["rank"], r["worker"], s) for r in records for s in r["shards"] if f"/{name}/" in s]
        assert {(rank, worker) for rank, worker, _ in owners} == {(0, 0), (0, 1), (1, 0), (1, 1)}
        assert len({s for _, _, s in owners}) == len(owners) == 8  # every shard read by exactly one stream


def test_bad_mixtures_are_clear_errors(tmp_path):
    streams = {"a": TrainStream(write_source(tmp_path, "hypersim", 2), batch_size=1)}
    with pytest.raises(ValueError, match="probabilities must be >= 0"):
        MixedTrainStream(streams, {"a": -1.0})
    with pytest.raises(ValueError, match="one probability per source"):
        MixedTrainStream(streams, {"b": 1.0})
    source = TrainSource("a", "x-*.tar", 1.0)
    with pytest.raises(ValueError, match="not both"):
        ShardDataModule(train_shards="x.tar", train_sources=[source])
    with pytest.raises(ValueError, match="distinct names"):
        ShardDataModule(train_sources=[source, source])


def test_mixture_config_composes_under_a_shard_root(tmp_path):
    for name in SIZES:
        write_source(tmp_path, name, 4)
    write_source(tmp_path / "tmp", "hypersim", 2)  # the config's validation shards: hypersim_val/val-*.tar
    (tmp_path / "hypersim_val").mkdir()
    (tmp_path / "tmp" / "hypersim" / "train-000000.tar").rename(tmp_path / "hypersim_val" / "val-000000.tar")
    cli = main([
        "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        "--config", str(ROOT / "configs/model/e2e_depth_tiny.yaml"),
        "--config", str(ROOT / "configs/data/hypersim_vkitti.yaml"),
        f"--data.init_args.shard_root={tmp_path}", "--data.init_args.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}",
    ], run=False)  # fmt: skip
    dm = cli.datamodule
    assert [(s.name, s.probability) for s in dm.train_sources] == [("hypersim", 0.9), ("vkitti2", 0.1)]
    sources = {b["source"][0] for b in islice(iter(dm.train_dataloader()), 60)}
    assert sources == {"hypersim", "vkitti2"}
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 2
