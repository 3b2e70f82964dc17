"""Training on several datasets: each micro-batch comes whole from one source, drawn with fixed probabilities.

docs/method.md §4.5 (Marigold's mixing): per micro-batch pick the source by its probability (Hypersim 0.9, Virtual KITTI
0.1), so resolutions never mix inside a batch and the effective batch mixes sources through accumulation. Every
source is an endless `TrainStream` (split by rank, then worker; resampled, so a small source simply cycles).
The choice is drawn from a generator seeded by (seed, global step at which the stream started, rank, worker): a
rerun with the same settings sees the same sequence of sources, and ranks draw independently (shapes may differ
across ranks).
webdataset's `RandomMix` draws from the global `random` module, which is neither seeded per stream nor
reproducible, hence this small class.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset

from datamodules.streams import TrainStream, distributed_rank, worker_rank


@dataclass
class TrainSource:
    """One training dataset of a mixture.

    Args:
        name: label of the source (logs, seeds); the batch's `source` key comes from the samples' metadata.
        shards: glob, brace pattern or list; relative paths are taken under the DataModule's `shard_root`.
        probability: chance that a micro-batch comes from this source (weights are normalised to sum 1).
    """

    name: str
    shards: str | list[str]
    probability: float


def source_seed(seed: int, name: str) -> int:
    """A stable per-source seed, so sources do not share shard choices and flips."""
    return zlib.crc32(f"{seed}/{name}".encode())


class MixedTrainStream(IterableDataset):
    """Endless micro-batches, each taken whole from one source stream chosen with seeded probabilities."""

    def __init__(self, streams: dict[str, TrainStream], probabilities: dict[str, float], seed: int = 0) -> None:
        if not streams or set(streams) != set(probabilities):
            raise ValueError(f"need one probability per source, got streams {list(streams)} and {list(probabilities)}")
        bad = {name: p for name, p in probabilities.items() if not p >= 0}
        if bad or sum(probabilities.values()) <= 0:
            raise ValueError(f"source probabilities must be >= 0 with a positive sum, got {probabilities}")
        self.names = list(streams)
        self.streams = [streams[name] for name in self.names]
        total = sum(probabilities.values())
        self.probabilities = [probabilities[name] / total for name in self.names]
        self.seed, self.seed_offset = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the source sequence and every source's sample order from the next iteration on."""
        self.seed_offset = epoch
        for stream in self.streams:
            stream.set_epoch(epoch)

    def source_sequence(self, count: int, rank: int = 0, worker: int = 0) -> list[str]:
        """The first `count` source names that `worker` of `rank` draws (what `__iter__` follows)."""
        rng = self._rng(rank, worker)
        return [self.names[self._draw(rng)] for _ in range(count)]

    def _rng(self, rank: int, worker: int) -> random.Random:
        return random.Random(f"mix/{self.seed}/{self.seed_offset}/{rank}/{worker}")

    def _draw(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.streams)), weights=self.probabilities)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _ = distributed_rank()
        worker, _ = worker_rank()
        rng = self._rng(rank, worker)
        # Each source's generator reads nothing until its first batch is drawn.
        iterators = [iter(stream) for stream in self.streams]
        while True:
            yield next(iterators[self._draw(rng)])
