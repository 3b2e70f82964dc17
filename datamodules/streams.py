"""Iterable datasets over shards: an endless shuffled training stream and a finite, padded validation pass.

Training shards are split by rank first (rank r of w reads shards[r::w]), then by dataloader worker, and
resampled forever inside that subset, so no two ranks read the same shard. A validation pass reads each shard
once: `plan_validation` gives every shard to one (rank, worker) slot from the shards' sample counts (manifest.json,
else counted from the tar headers: `shard_format.sample_count`), balancing the ranks' samples first, then each
rank's workers; every rank's worker w yields the same number of samples, quota_w (the most any rank's worker w
has), padding with masked-out copies, so every rank yields the same number of batches in the DataLoader's
worker-by-worker order (unequal counts deadlock DDP) while nothing is counted twice. A shard that yields fewer
samples than its count is padded up; one that yields more is capped at its count (the extras are counted as
`bad_sample`). Only a pass with a key filter (`keys`), or over shards whose counts cannot be known, is split by
sample: every rank and worker reads every shard and keeps its share (sample i: rank i % w, then its workers in
turn).

Bad data never stops a pass and is never dropped silently: every sample lost is counted by reason
(`datamodules.targets.SKIP_REASONS`), warned about with its key, shard and reason (training re-reads shards: a
repeat of the same skip is logged at DEBUG), and handed on in the next sample's `skipped` counts (the batch
contract), which reach the main process with the batch however many dataloader workers there are. A shard is read
as a whole (`read_shard`): one that cannot be read counts `unreadable_shard`; one whose tar stops early (a read
error, no end-of-archive marker, a bad header in the middle, fewer samples than its manifest lists) drops its
partial last sample and counts `truncated_shard` for every sample lost, exactly from its folder's `manifest.json`
when that gives the shard's count, else as 1 (a lower bound, logged as "at least 1"). In a validation pass split by
shard, the worker that reads a shard counts all of its skips; split by sample, only rank 0's worker 0 counts
shard-level skips (every rank and worker reads every shard), and each sample's own skips are counted by the rank
and worker it belongs to.

Set `DGFT_SHARD_LOG=<file>` to append each stream's shard assignment as a JSON line (split, rank, world_size,
worker, shards; validation adds split_by: `shard` or `sample`).
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate

from datamodules.shard_format import (
    REQUIRED_MEMBERS,
    SampleFormatError,
    decode_sample,
    expected_samples,
    sample_count,
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


def _record_assignment(
    split: str, rank: int, world: int, worker: int, shards: list[str], split_by: str | None = None
) -> None:
    """Log which shards a stream reads; with DGFT_SHARD_LOG, append it there as a JSON line."""
    log.info("%s stream: rank %d/%d worker %d reads %d shards", split, rank, world, worker, len(shards))
    path = os.environ.get("DGFT_SHARD_LOG")
    if path:
        with open(path, "a") as handle:
            record = dict(split=split, rank=rank, world_size=world, worker=worker, shards=shards)
            if split_by is not None:
                record["split_by"] = split_by  # validation: `shard` (each read once) or `sample` (all read by all)
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


def read_shard(url: str, skips: SkipLog, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples (WebDataset member dicts) of one shard; what cannot be read is counted in `skips`.

    A shard whose tar stops early (a read error; no end-of-archive marker or a bad header in the middle, found by
    `tar_damage`; fewer samples than its manifest lists) yields its complete samples and drops a partial last one;
    the samples lost are counted from `manifest.json` when it gives the shard's count (exact), else as 1 (at least).
    `limit`: only the first `limit` samples are wanted: reading stops there, and only those can be counted lost.
    """
    errors: list[Exception] = []

    def handler(error: Exception) -> bool:
        errors.append(error)
        return True

    if limit is not None and limit < 1:
        return
    read, held = 0, None
    for sample in wds.tarfile_to_samples(handler=handler)([{"url": url}]):
        if held is not None:
            read += 1
            yield held
            if limit is not None and read >= limit:
                return  # the samples after the limit are not wanted: neither read nor checked
        held = sample
    damage = None if errors else tar_damage(url)
    expected = expected_samples(url)
    if expected is not None and limit is not None:
        expected = min(expected, limit)  # only the wanted samples can be lost
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


def _decoded(
    raw_samples: Iterable[dict[str, Any]], errors: SkipLog, transform: Callable, decode_normals: bool = True
) -> Iterator[dict]:
    """Decoded, transformed samples, each with the skip counts since the previous one as its `skipped` row."""
    for raw in raw_samples:
        try:
            sample = transform(decode_sample(raw, normals=decode_normals))
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
        decode_normals: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shards:
            raise ValueError("TrainStream needs at least one shard")
        self.decode_normals = decode_normals
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
            sample = build_targets(decoded, self.min_depth, self.max_depth, with_normals=self.decode_normals)
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
        raw = read_shards(urls, errors)
        if self.shuffle_buffer > 1:
            # Shuffle the still-compressed samples: the buffer holds ~1 MB per 480x640 sample instead of ~13 MB
            # of decoded float tensors (100 samples: 0.1 GB per worker, not 1.3 GB).
            raw = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        samples = _decoded(raw, errors, self._transform(rng), self.decode_normals)
        return batches(samples, self.batch_size, drop_last=True)


@dataclass(frozen=True)
class ValidationPlan:
    """Which (rank, worker) reads which shards in a validation pass, and how many samples each worker yields.

    `take[i]`: the samples read from shard i (its count; fewer for the shard where `max_samples` ends, 0 after it);
    `cut[i]`: shard i is read only up to `take[i]` (`max_samples`); `read[i]`: shard i is read at all; `slots[rank]
    [worker]`: the shard indices that worker reads, in shard order; `quotas[worker]`: samples (real and padding) that
    worker yields on every rank, the most any rank's worker of that index has.
    """

    take: tuple[int, ...]
    cut: tuple[bool, ...]
    read: tuple[bool, ...]
    slots: tuple[tuple[tuple[int, ...], ...], ...]
    quotas: tuple[int, ...]

    @property
    def total(self) -> int:
        """Samples of the pass (before padding)."""
        return sum(self.take)

    def load(self, rank: int, worker: int) -> int:
        """Samples `worker` of `rank` reads (before padding)."""
        return sum(self.take[i] for i in self.slots[rank][worker])

    def batches(self, batch_size: int) -> int:
        """Batches every rank yields: each worker's samples are batched apart (the DataLoader takes turns)."""
        return sum(math.ceil(quota / batch_size) for quota in self.quotas)


def plan_validation(counts: list[int], world: int, workers: int, max_samples: int | None = None) -> ValidationPlan:
    """Share shards with `counts` samples out over `world` ranks x `workers` workers, each shard to one of them.

    `max_samples`: only the first N samples in shard order (the first shards, the last of them in part). Shards go
    to ranks largest first, each to the rank with the fewest samples so far (ties: the lowest rank), then within
    each rank to its workers the same way; a shard without samples (empty, or unreadable without a manifest entry)
    goes to the worker with the most, which yields at least one sample to carry the shard's skip counts. Every
    rank's worker w then yields quota_w = max over ranks of the samples of (rank, w), padding up to it. A pure
    function of its arguments: every rank and worker computes the same plan.
    """
    if world < 1 or workers < 1:
        raise ValueError(f"need world >= 1 and workers >= 1, got {world}, {workers}")
    take, cut, read = list(counts), [False] * len(counts), [True] * len(counts)
    if max_samples is not None:
        left = max_samples
        for index, count in enumerate(counts):
            read[index] = left > 0
            take[index] = min(count, left)
            cut[index] = take[index] < count
            left -= take[index]
    largest_first = sorted((i for i in range(len(take)) if read[i] and take[i] > 0), key=lambda i: (-take[i], i))
    rank_load, rank_shards = [0] * world, [[] for _ in range(world)]
    for index in largest_first:
        rank = min(range(world), key=lambda r: (rank_load[r], r))
        rank_load[rank] += take[index]
        rank_shards[rank].append(index)
    load = [[0] * workers for _ in range(world)]
    slots: list[list[list[int]]] = [[[] for _ in range(workers)] for _ in range(world)]
    for rank, shards in enumerate(rank_shards):
        for index in shards:  # largest first already
            worker = min(range(workers), key=lambda w: (load[rank][w], w))
            load[rank][worker] += take[index]
            slots[rank][worker].append(index)
    for index in (i for i in range(len(take)) if read[i] and take[i] == 0):
        rank, worker = min(
            ((r, w) for r in range(world) for w in range(workers)), key=lambda rw: (-load[rw[0]][rw[1]], rw)
        )
        slots[rank][worker].append(index)
    quotas = tuple(max(load[rank][worker] for rank in range(world)) for worker in range(workers))
    return ValidationPlan(
        tuple(take), tuple(cut), tuple(read), tuple(tuple(tuple(sorted(s)) for s in rank) for rank in slots), quotas
    )


class ValidationStream(IterableDataset):
    """One deterministic pass over all samples, shared out over ranks and workers with masked padding.

    Each shard is read by one (rank, worker) (`plan_validation`, from the shards' counts: `sample_count`), which
    also counts the shard's skips; every rank yields the same number of batches. `keys` keeps only samples with
    those keys, `max_samples` only the first N (after `keys`), in shard order: a fixed subset for validation during
    training. Without `keys`, the first N follow the shards' counts (the first shards, the last in part), so a
    damaged shard's lost samples are counted, not replaced by later ones. With `keys`, or when a shard's count cannot
    be known (not a local `.tar`, no manifest entry), every rank and worker reads every shard and keeps its share of
    the samples (sample i: rank i % world, then worker (i // world) % workers). Sizes need not be multiples of 8
    (prediction pads).
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
        max_samples: int | None = None,
        keys: set[str] | None = None,
        decode_normals: bool = True,
    ) -> None:
        self.decode_normals = decode_normals
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

    def sample_counts(self) -> list[int] | None:
        """Each shard's sample count (manifest.json, else its tar headers; cached per file version), or None when
        the pass is split by sample (`keys`, or a shard whose count cannot be known)."""
        if self.keys is not None:
            return None
        counts = [sample_count(shard) for shard in self.shards]
        return None if any(count is None for count in counts) else counts  # type: ignore[return-value]

    def plan(self, world: int, workers: int) -> ValidationPlan | None:
        """The shard-level plan of a pass over `world` ranks x `workers` workers; None: split by sample."""
        counts = self.sample_counts()
        return None if counts is None else plan_validation(counts, world, workers, self.max_samples)

    def assignment(self, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards that `worker` of `rank` reads (all of them when the pass is split by sample)."""
        plan = self.plan(world, workers)
        return self.shards if plan is None else [self.shards[i] for i in plan.slots[rank][worker]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = distributed_rank()
        worker, workers = worker_rank()
        return batches(self._padded(rank, world, worker, workers), self.batch_size, drop_last=False)

    def _target(self, raw: dict[str, Any]) -> dict[str, Any]:
        return self._targets(decode_sample(raw, normals=self.decode_normals))

    def _targets(self, decoded: dict[str, Any]) -> dict[str, Any]:
        """Evaluation targets at any size (validation shards are not resized to the VAE factor)."""
        return build_targets(decoded, self.min_depth, self.max_depth, vae_factor=1, with_normals=self.decode_normals)

    def _blank(self) -> dict[str, Any]:
        """A shape template for a worker without a real sample: its batches are all padding, which no model runs."""
        blank = {"key": PAD_KEY, "rgb": np.zeros((8, 8, 3), np.uint8), "depth": np.zeros((8, 8), np.float32),
                 "mask": np.zeros((8, 8), bool), "meta": {}}  # fmt: skip
        return self._targets(blank)

    def _padded(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """The samples `worker` of `rank` yields in a pass (real ones, then padding), unbatched."""
        plan = self.plan(world, workers)
        if plan is None:
            _record_assignment("val", rank, world, worker, self.shards, split_by="sample")
            return self._by_sample(rank, world, worker, workers)
        mine = [self.shards[i] for i in plan.slots[rank][worker]]
        _record_assignment("val", rank, world, worker, mine, split_by="shard")
        return self._by_shard(plan, rank, worker)

    def _by_shard(self, plan: ValidationPlan, rank: int, worker: int) -> Iterator[dict[str, Any]]:
        errors = SkipLog("validation")
        yielded = 0
        template = held = None
        # Each sample is held back until the next, so that skips after this worker's last sample still ride on it.
        for index in plan.slots[rank][worker]:
            url, cap = self.shards[index], plan.take[index]
            extra = 0
            raw_samples = read_shard(url, errors, limit=cap if plan.cut[index] else None)
            for taken, raw in enumerate(raw_samples):
                if taken >= cap:  # more than counted: capped, or the ranks' batch counts would differ
                    extra += 1
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
            if extra:
                source = "its manifest.json lists" if expected_samples(url) is not None else "its tar headers show"
                errors.skip(
                    "bad_sample", extra,
                    f"{extra} samples of shard {url} [bad_sample]: it holds more than the {cap} samples {source}; the "
                    f"pass was planned from that count, so they are not evaluated (rewrite the folder's manifest.json)",
                    (url, "extra samples"),
                )  # fmt: skip
        if held is not None:
            held["skipped"] = held["skipped"] + errors.take()
            yield held
        self.skipped, self.skip_counts = errors.count, dict(errors.totals)
        if plan.total == 0:
            raise RuntimeError(
                f"no readable validation samples in {len(self.shards)} shards"
                + (f" (skipped {describe_skips(errors.totals)})" if errors.count else "")
            )
        level = logging.WARNING if errors.count else logging.INFO
        log.log(level, "validation pass, rank %d worker %d: read %d samples of %d shards, skipped %s", rank, worker,
                yielded, len(plan.slots[rank][worker]), describe_skips(errors.totals))  # fmt: skip
        yield from self._pads(plan.quotas[worker] - yielded, template, errors)

    def _pads(self, count: int, template: dict[str, Any] | None, errors: SkipLog) -> Iterator[dict[str, Any]]:
        if count > 0 and template is None:
            template = self._blank()
        for _ in range(count):
            pad = pad_like(template)
            pad["skipped"] = errors.take()  # only counts that no real sample of this worker could carry
            yield pad

    def _raw(self, errors: SkipLog) -> Iterator[dict[str, Any]]:
        raw = read_shards(self.shards, errors)
        if self.keys is not None:
            raw = (sample for sample in raw if sample.get("__key__") in self.keys)
        return raw if self.max_samples is None else itertools.islice(raw, self.max_samples)

    def _by_sample(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        errors = SkipLog("validation")
        # Every rank and worker reads every shard: only one counts what is wrong with the shards themselves.
        shard_errors = errors if rank == 0 and worker == 0 else SkipLog("validation", quiet=True)
        total = yielded = 0
        template = held = None
        seen: set[str] = set()
        # Streams the tar files (nothing held in memory); only this worker's samples are decoded, each held back
        # until the next, as in `_by_shard`.
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
        yield from self._pads(quota - yielded, template, errors)


def pad_like(sample: dict[str, Any]) -> dict[str, Any]:
    """A same-shaped stand-in sample with an empty mask: metrics skip it, so nothing is counted twice."""
    pad = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
    pad["key"], pad["mask"], pad["skipped"] = PAD_KEY, torch.zeros_like(sample["mask"]), no_skips()
    return pad
