"""Iterable datasets over shards: an endless shuffled training stream and a finite, padded validation pass.

Training shards are split by rank first (rank r of w reads shards[r::w]), then by dataloader worker, and
resampled forever inside that subset, so no two ranks read the same shard. Validation reads every shard in a
fixed order on every rank; rank r keeps samples i with i % w == r (its workers take turns within that share)
and pads with masked-out copies so every rank yields the same number of samples and batches (unequal counts
deadlock DDP) while nothing is counted twice.

Set `DGFT_SHARD_LOG=<file>` to append each stream's shard assignment as a JSON line (rank, worker, shards).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate

from datamodules.shard_format import SampleFormatError, decode_sample
from datamodules.targets import build_targets, hflip

log = logging.getLogger(__name__)
PAD_KEY = "__pad__"


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): RANK/WORLD_SIZE when both are set, else torch.distributed, else (0, 1) (webdataset's rule)."""
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def worker_rank() -> tuple[int, int]:
    """(worker id, number of workers) of the current dataloader worker, (0, 1) in the main process."""
    _, _, worker, workers = wds.utils.pytorch_worker_info()
    return worker, workers


def shards_for(shards: list[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """This rank's shards (strided), then this worker's share of them; whole rank share if too few."""
    if len(shards) < world:
        raise ValueError(f"{len(shards)} training shards cannot be split over {world} processes; write more shards")
    mine = shards[rank::world]
    share = mine[worker::workers]
    if not share:
        log.warning(
            "rank %d has %d shards for %d workers: workers share them (seeded apart); write >= %d shards",
            rank, len(mine), workers, world * workers,
        )  # fmt: skip
        share = mine
    return share


def _record_assignment(split: str, rank: int, world: int, worker: int, shards: list[str]) -> None:
    log.info("%s stream: rank %d/%d worker %d reads %d shards", split, rank, world, worker, len(shards))
    path = os.environ.get("DGFT_SHARD_LOG")
    if path:
        with open(path, "a") as handle:
            record = dict(split=split, rank=rank, world_size=world, worker=worker, shards=shards)
            handle.write(json.dumps(record) + "\n")


def _describe(error: Exception) -> str:
    """WebDataset appends the shard URL to an exception's args; show it plainly."""
    args = getattr(error, "args", ())
    if len(args) >= 2 and isinstance(args[-1], str) and not isinstance(error, SampleFormatError):
        return f"{type(error).__name__}: {args[0]} (shard {args[-1]})"
    return f"{type(error).__name__}: {error}"


class SkipCounter:
    """WebDataset error handler that logs and counts bad shards/samples instead of stopping the run."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.count, self.in_a_row = limit, 0, 0

    def __call__(self, error: Exception) -> bool:
        self.count += 1
        self.in_a_row += 1
        log.warning("skipped unreadable data (%d so far): %s", self.count, _describe(error))
        if self.limit is not None and self.in_a_row > self.limit:
            raise RuntimeError(
                f"{self.in_a_row} read errors in a row without a good sample from any shard; last: {_describe(error)}"
            ) from error
        return True

    def ok(self) -> None:
        self.in_a_row = 0


def _decoded(raw_samples: Iterable[dict[str, Any]], errors: SkipCounter, transform: Callable) -> Iterator[dict]:
    for raw in raw_samples:
        try:
            sample = transform(decode_sample(raw))
        except SampleFormatError as err:
            errors(err)
            continue
        errors.ok()
        yield sample


def batches(samples: Iterable[dict[str, Any]], batch_size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    """Group samples with `wds.batched` and collate them (tensors stacked, `key`/`source` strings become lists)."""
    return wds.batched(batch_size, collation_fn=default_collate, partial=not drop_last)(iter(samples))


class TrainStream(IterableDataset):
    """Endless stream of micro-batches from resampled shards, split by rank and worker."""

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        shuffle_buffer: int = 100,
        hflip_prob: float = 0.5,
        seed: int = 0,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shards:
            raise ValueError("TrainStream needs at least one shard")
        self.shards, self.batch_size, self.shuffle_buffer = list(shards), batch_size, shuffle_buffer
        self.hflip_prob, self.seed, self.min_depth, self.max_depth = hflip_prob, seed, min_depth, max_depth
        # Part of the order's seed: set it before iterating (the global step it starts at) so a resumed run does
        # not replay the samples of the first one. Workers copy it when they start.
        self.seed_offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the sample order from the next iteration on."""
        self.seed_offset = epoch

    def assignment(self, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards that `worker` of `rank` reads."""
        return shards_for(self.shards, rank, world, worker, workers)

    def _transform(self, rng: random.Random) -> Callable[[dict], dict]:
        def transform(decoded: dict) -> dict:
            sample = build_targets(decoded, self.min_depth, self.max_depth)
            return hflip(sample) if rng.random() < self.hflip_prob else sample

        return transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = distributed_rank()
        worker, workers = worker_rank()
        share = self.assignment(rank, world, worker, workers)
        _record_assignment("train", rank, world, worker, share)
        rng = random.Random(f"{self.seed}/{self.seed_offset}/{rank}/{worker}")
        # Enough consecutive failures to have tried every shard several times: then nothing is readable.
        errors = SkipCounter(limit=10 * len(share) + 100)
        urls = ({"url": rng.choice(share)} for _ in iter(int, 1))
        raw = wds.tarfile_to_samples(handler=errors)(urls)
        samples = _decoded(raw, errors, self._transform(rng))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return batches(samples, self.batch_size, drop_last=True)


class ValidationStream(IterableDataset):
    """One deterministic pass over all samples, shared out over ranks and workers with masked padding.

    `keys` keeps only samples with those keys, `max_samples` only the first N (after `keys`), in shard order: a
    fixed subset for validation during training. Sizes need not be multiples of 8 (prediction pads).
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
        max_samples: int | None = None,
        keys: set[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shards:
            raise ValueError("ValidationStream needs at least one shard")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.shards, self.batch_size = sorted(shards), batch_size
        self.min_depth, self.max_depth = min_depth, max_depth
        self.max_samples, self.keys = max_samples, keys
        self.skipped = 0  # unreadable data in the last pass (main-process iteration only)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = distributed_rank()
        worker, workers = worker_rank()
        _record_assignment("val", rank, world, worker, self.shards)
        return batches(self._padded(rank, world, worker, workers), self.batch_size, drop_last=False)

    def _target(self, raw: dict[str, Any]) -> dict[str, Any]:
        return build_targets(decode_sample(raw), self.min_depth, self.max_depth, vae_factor=1)

    def _raw(self, errors: SkipCounter) -> Iterator[dict[str, Any]]:
        raw = wds.tarfile_to_samples(handler=errors)({"url": s} for s in self.shards)
        if self.keys is not None:
            raw = (sample for sample in raw if sample.get("__key__") in self.keys)
        return raw if self.max_samples is None else itertools.islice(raw, self.max_samples)

    def _padded(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        errors = SkipCounter(limit=None)
        total = yielded = 0
        template = None
        seen: set[str] = set()
        # Streams the tar files (nothing held in memory); only this worker's samples are decoded.
        for index, raw in enumerate(self._raw(errors)):
            total += 1
            seen.add(raw.get("__key__"))
            if index % world != rank or (index // world) % workers != worker:
                continue
            try:
                sample = self._target(raw)
            except SampleFormatError as err:
                errors(err)
                continue
            template = template or sample
            yielded += 1
            yield sample
        self.skipped = errors.count
        if total == 0:
            selected = " with the selected keys" if self.keys is not None else ""
            raise RuntimeError(f"no readable validation samples{selected} in {len(self.shards)} shards")
        missing = sorted(self.keys - seen) if self.keys is not None and self.max_samples is None else []
        if missing and rank == 0 and worker == 0:
            log.warning("%d selected validation keys are not in the shards, e.g. %s", len(missing), missing[:3])
        # Rank r's j-th sample goes to worker j % workers; every rank owns ceil(total / world) slots.
        quota = len(range(worker, math.ceil(total / world), workers))
        if yielded < quota and template is None:
            template = self._any_sample()
        for _ in range(quota - yielded):
            yield pad_like(template)

    def _any_sample(self) -> dict[str, Any]:
        """Some decodable sample of the set, as the shape template for padding."""
        for raw in self._raw(SkipCounter(limit=None)):
            try:
                return self._target(raw)
            except SampleFormatError:
                continue
        raise RuntimeError(f"no decodable validation sample in {len(self.shards)} shards")


def pad_like(sample: dict[str, Any]) -> dict[str, Any]:
    """A same-shaped stand-in sample with an empty mask: metrics skip it, so nothing is counted twice."""
    pad = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
    pad["key"], pad["mask"] = PAD_KEY, torch.zeros_like(sample["mask"])
    return pad
