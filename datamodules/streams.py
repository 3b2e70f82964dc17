"""Iterable datasets over shards: an endless shuffled training stream and a finite, padded validation pass.

Training shards are split by rank first (rank r of w reads shards[r::w]), then by dataloader worker, and
resampled forever inside that subset, so no two ranks read the same shard. Validation reads every shard in a
fixed order on every rank; rank r keeps samples i with i % w == r (its workers take turns within that share)
and pads with masked-out copies so every rank yields the same number of samples and batches (unequal counts
deadlock DDP) while nothing is counted twice.

Bad data never stops a pass and is never dropped silently: every sample lost is counted by reason
(`datamodules.targets.SKIP_REASONS`), warned about with its key, shard and reason (training re-reads shards: a
repeat of the same skip is logged at DEBUG), and handed on in the next sample's `skipped` counts (the batch
contract), which reach the main process with the batch however many dataloader workers there are. A shard is read
as a whole (`read_shard`): one that cannot be read counts `unreadable_shard`; one whose tar stops early (a read
error, no end-of-archive marker, a bad header in the middle, fewer samples than its manifest lists) drops its
partial last sample and counts `truncated_shard` for every sample lost, exactly from its folder's `manifest.json`
when that gives the shard's count, else as 1 (a lower bound, logged as "at least 1"). Only rank 0's worker 0 counts
shard-level skips of a validation pass (every rank and worker reads every shard); each sample's own skips are
counted by the rank and worker it belongs to.

Set `DGFT_SHARD_LOG=<file>` to append each stream's shard assignment as a JSON line (rank, worker, shards).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate

from datamodules.shard_format import (
    REQUIRED_MEMBERS,
    SampleFormatError,
    decode_sample,
    expected_samples,
    tar_damage,
)
from datamodules.targets import SKIP_REASONS, build_targets, describe_skips, hflip, no_skips, skip_row

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
    """An exception as `Type: message`, without the stream object and URL webdataset appends to its args."""
    args = getattr(error, "args", ())
    if args and not isinstance(error, SampleFormatError):
        return f"{type(error).__name__}: {str(args[0]).split(' @ ')[0]}"
    return f"{type(error).__name__}: {error}"


class SkipLog:
    """Counts skipped data per reason, warns about each skip, and hands the counts on to the next sample.

    `take()` returns the counts since its last call as a `skipped` row and clears them. With `limit`, more than
    `limit` skips in a row without a good sample (`ok()`) raise: then nothing is readable. `quiet` logs at DEBUG
    (a validation worker that reads shards only to find its own samples).
    """

    def __init__(self, stream: str, limit: int | None = None, quiet: bool = False) -> None:
        self.stream, self.limit, self.quiet = stream, limit, quiet
        self.totals: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()
        self.in_a_row = 0
        self._warned: set[tuple[str, ...]] = set()

    @property
    def count(self) -> int:
        """Samples skipped so far, all reasons."""
        return sum(self.totals.values())

    def skip(self, reason: str, lost: int, message: str, where: tuple[str, ...]) -> None:
        """Count `lost` samples for `reason`; warn (`where` identifies the skip, so repeats log at DEBUG)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to datamodules.targets.SKIP_REASONS")
        self.totals[reason] += lost
        self.pending[reason] += lost
        self.in_a_row += 1
        repeat = where in self._warned
        if not repeat and len(self._warned) < 100_000:
            self._warned.add(where)
        level = logging.DEBUG if self.quiet or repeat else logging.WARNING
        log.log(level, "%s stream: skipped %s (so far %s)", self.stream, message, describe_skips(self.totals))
        if self.limit is not None and self.in_a_row > self.limit:
            raise RuntimeError(
                f"{self.in_a_row} read errors in a row without a good sample from any shard; last: {message}"
            )

    def sample_error(self, error: SampleFormatError, raw: dict[str, Any]) -> None:
        """Count one undecodable sample; its message names the key and the shard."""
        url = str(raw.get("__url__"))
        shard = "" if url in str(error) else f" (in {url})"
        self.skip(
            error.reason, 1, f"a sample [{error.reason}]: {error}{shard}", (url, str(raw.get("__key__")), error.reason)
        )

    def ok(self) -> None:
        self.in_a_row = 0

    def take(self) -> torch.Tensor:
        row = skip_row(self.pending)
        self.pending.clear()
        return row


def read_shard(url: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """The raw samples (WebDataset member dicts) of one shard; what cannot be read is counted in `skips`.

    A shard whose tar stops early (a read error; no end-of-archive marker or a bad header in the middle, found by
    `tar_damage`; fewer samples than its manifest lists) yields its complete samples and drops a partial last one;
    the samples lost are counted from `manifest.json` when it gives the shard's count (exact), else as 1 (at least).
    """
    errors: list[Exception] = []

    def handler(error: Exception) -> bool:
        errors.append(error)
        return True

    read, held = 0, None
    for sample in wds.tarfile_to_samples(handler=handler)([{"url": url}]):
        if held is not None:
            read += 1
            yield held
        held = sample
    damage = None if errors else tar_damage(url)
    expected = expected_samples(url)
    if not errors and damage is None and (expected is None or read + (held is not None) >= expected):
        if held is not None:
            yield held
        return
    if held is not None and all(member in held for member in REQUIRED_MEMBERS):
        read += 1  # the last sample is whole: the cut came after it
        yield held
        held = None
    cause = _describe(errors[-1]) if errors else damage or "fewer samples than its manifest.json lists"
    if read == 0 and held is None:
        reason = "unreadable_shard"
        lost = expected if expected is not None else 1
        count = f"{expected} samples per manifest.json" if expected is not None else "at least 1 sample"
        message = f"shard {url} [{reason}, {count}]: it cannot be read ({cause})"
    else:
        reason = "truncated_shard"
        partial = "" if held is None else f"; its partial last sample {held.get('__key__')!r} is dropped"
        if expected is not None:
            lost = max(expected - read, 0)
            message = (
                f"{lost} samples of shard {url} [{reason}]: it stops early ({cause}) after {read} of its {expected} "
                f"samples (manifest.json){partial}"
            )
        else:
            lost = 1
            message = (
                f"at least 1 sample of shard {url} [{reason}]: it stops early ({cause}) after {read} complete samples"
                f"{partial}; no manifest.json gives the shard's count, so samples after the cut are not counted"
            )
    if lost:
        skips.skip(reason, lost, message, (url, reason))
    else:
        log.warning("%s stream: shard %s is damaged (%s) but all its samples were read", skips.stream, url, cause)


def read_shards(urls: Iterable[str], skips: SkipLog) -> Iterator[dict[str, Any]]:
    """`read_shard` over `urls` in order."""
    for url in urls:
        yield from read_shard(url, skips)


def _decoded(raw_samples: Iterable[dict[str, Any]], errors: SkipLog, transform: Callable) -> Iterator[dict]:
    """Decoded, transformed samples, each with the skip counts since the previous one as its `skipped` row."""
    for raw in raw_samples:
        try:
            sample = transform(decode_sample(raw))
        except SampleFormatError as err:
            errors.sample_error(err, raw)
            continue
        errors.ok()
        sample["skipped"] = errors.take()
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
        errors = SkipLog("training", limit=10 * len(share) + 100)
        urls = (rng.choice(share) for _ in iter(int, 1))
        samples = _decoded(read_shards(urls, errors), errors, self._transform(rng))
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
        self.skipped = 0  # samples skipped in the last pass (main-process iteration only)
        self.skip_counts: dict[str, int] = {}  # ... by reason

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = distributed_rank()
        worker, workers = worker_rank()
        _record_assignment("val", rank, world, worker, self.shards)
        return batches(self._padded(rank, world, worker, workers), self.batch_size, drop_last=False)

    def _target(self, raw: dict[str, Any]) -> dict[str, Any]:
        return build_targets(decode_sample(raw), self.min_depth, self.max_depth, vae_factor=1)

    def _raw(self, errors: SkipLog) -> Iterator[dict[str, Any]]:
        raw = read_shards(self.shards, errors)
        if self.keys is not None:
            raw = (sample for sample in raw if sample.get("__key__") in self.keys)
        return raw if self.max_samples is None else itertools.islice(raw, self.max_samples)

    def _padded(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        errors = SkipLog("validation")
        # Every rank and worker reads every shard: only one counts what is wrong with the shards themselves.
        shard_errors = errors if rank == 0 and worker == 0 else SkipLog("validation", quiet=True)
        total = yielded = 0
        template = held = None
        seen: set[str] = set()
        # Streams the tar files (nothing held in memory); only this worker's samples are decoded. Each sample is
        # held back until the next, so that skips after this worker's last sample still ride on it.
        for index, raw in enumerate(self._raw(shard_errors)):
            total += 1
            seen.add(raw.get("__key__"))
            if index % world != rank or (index // world) % workers != worker:
                continue
            try:
                sample = self._target(raw)
            except SampleFormatError as err:
                errors.sample_error(err, raw)
                continue
            sample["skipped"] = errors.take()
            template = template or sample
            if held is not None:
                yield held
            held = sample
            yielded += 1
        if held is not None:
            held["skipped"] = held["skipped"] + errors.take()
            yield held
        self.skipped, self.skip_counts = errors.count, dict(errors.totals)
        if total == 0:
            selected = " with the selected keys" if self.keys is not None else ""
            raise RuntimeError(
                f"no readable validation samples{selected} in {len(self.shards)} shards"
                + (f" (skipped {describe_skips(shard_errors.totals)})" if shard_errors.count else "")
            )
        missing = sorted(self.keys - seen) if self.keys is not None and self.max_samples is None else []
        if missing and rank == 0 and worker == 0:
            log.warning("%d selected validation keys are not in the shards, e.g. %s", len(missing), missing[:3])
        # Rank r's j-th sample goes to worker j % workers; every rank owns ceil(total / world) slots.
        quota = len(range(worker, math.ceil(total / world), workers))
        level = logging.WARNING if errors.count else logging.INFO
        log.log(level, "validation pass, rank %d worker %d: read %d samples, skipped %s", rank, worker, yielded,
                describe_skips(errors.totals))  # fmt: skip
        if yielded < quota and template is None:
            template = self._any_sample()
        for _ in range(quota - yielded):
            pad = pad_like(template)
            pad["skipped"] = errors.take()  # only counts that no real sample of this worker could carry
            yield pad

    def _any_sample(self) -> dict[str, Any]:
        """Some decodable sample of the set, as the shape template for padding."""
        quiet = SkipLog("validation", quiet=True)
        for raw in self._raw(quiet):
            try:
                return self._target(raw)
            except SampleFormatError:
                continue
        raise RuntimeError(f"no decodable validation sample in {len(self.shards)} shards")


def pad_like(sample: dict[str, Any]) -> dict[str, Any]:
    """A same-shaped stand-in sample with an empty mask: metrics skip it, so nothing is counted twice."""
    pad = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
    pad["key"], pad["mask"], pad["skipped"] = PAD_KEY, torch.zeros_like(sample["mask"]), no_skips()
    return pad
