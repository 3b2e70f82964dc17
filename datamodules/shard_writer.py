"""Write shards atomically: a shard appears under its final name only when complete, so reruns resume.

`ShardWriter` also records each finished shard's sample count in the folder's `manifest.json` (`shards`,
`samples_per_shard`, the converters' format, read by `shard_format.expected_samples`), merged into a manifest that
is already there (other shards and keys are kept) and replaced atomically. Two writers must not write one folder's
manifest at the same time (the last one would drop the other's shards).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds

from datamodules.shard_format import MANIFEST, manifest_counts

log = logging.getLogger(__name__)


def shard_path(folder: str | Path, prefix: str, index: int) -> Path:
    """`<folder>/<prefix>-NNNNNN.tar`."""
    return Path(folder) / f"{prefix}-{index:06d}.tar"


def update_manifest(folder: str | Path, counts: dict[str, int]) -> Path:
    """Record `counts` (shard file name -> samples) in `folder`'s manifest.json, atomically; return its path.

    An existing manifest is merged, not replaced: its other keys and shards stay (a synthetic manifest's counts,
    given by its params, are written out per shard), a shard named again gets the new count, new shards are
    appended, and `written` (the converters' total) is recomputed. An unreadable manifest is replaced, with a warning.
    """
    path = Path(folder) / MANIFEST
    manifest: dict[str, Any] = {}
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        loaded = {}
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): replaced by one listing the shards just written", path, error)
        loaded = {}
    if isinstance(loaded, dict):
        manifest = loaded
    elif loaded:
        log.warning("%s is not a JSON object: replaced by one listing the shards just written", path)
    known = manifest_counts(manifest)
    names = [str(name) for name in manifest.get("shards") or []]
    per_shard: list[int | None] = [known.get(name) for name in names]
    for name, count in counts.items():
        if name in names:
            per_shard[names.index(name)] = count
        else:
            names.append(name)
            per_shard.append(count)
    manifest.update(shards=names, samples_per_shard=per_shard)
    if isinstance(manifest.get("written"), int):
        manifest["written"] = sum(count for count in per_shard if count is not None)
    if isinstance(manifest.get("shards_without_record"), list):
        manifest["shards_without_record"] = [n for n in manifest["shards_without_record"] if n not in counts]
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


class AtomicShardWriter:
    """Writes `<prefix>-NNNNNN.tar` files in `folder` via a temporary name and a rename."""

    def __init__(self, folder: str | Path, prefix: str) -> None:
        self.folder, self.prefix = Path(folder), prefix
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        """Final path of shard `index`."""
        return shard_path(self.folder, self.prefix, index)

    def write(self, index: int, samples: Iterable[dict[str, Any]]) -> Path:
        """Write one shard unless it already exists (samples are then not consumed); return its path."""
        final = self.path(index)
        if final.is_file():
            return final
        tmp = final.with_name(final.name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for sample in samples:
                sink.write(sample)
        os.replace(tmp, final)
        return final


class ShardWriter:
    """Streams encoded samples into `<prefix>-NNNNNN.tar` shards of `samples_per_shard` each, atomically.

    Use as a context manager; each full shard is renamed from `*.tar.tmp` when closed, the last (partial) one on
    a clean exit. On an exception the unfinished shard is deleted, so only complete shards ever exist. `close` (and
    an exception, for the shards finished before it) records their counts in the folder's manifest.json
    (`update_manifest`; `manifest=False`: not).
    """

    def __init__(
        self, folder: str | Path, prefix: str, samples_per_shard: int, start_index: int = 0, manifest: bool = True
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.folder, self.prefix, self.samples_per_shard = Path(folder), prefix, samples_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count, self.manifest = start_index, 0, manifest
        self.written: list[Path] = []
        self.counts: dict[str, int] = {}  # samples per finished shard (file name), not yet in the manifest
        self._sink: wds.TarWriter | None = None

    def _tmp(self) -> Path:
        final = shard_path(self.folder, self.prefix, self.index)
        return final.with_name(final.name + ".tmp")

    def write(self, sample: dict[str, Any]) -> None:
        """Append one encoded sample (see shard_format.encode_sample), starting a new shard when full."""
        if self._sink is None:
            self._sink = wds.TarWriter(str(self._tmp()), encoder=False)
        self._sink.write(sample)
        self.count += 1
        if self.count == self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        assert self._sink is not None
        self._sink.close()
        final = shard_path(self.folder, self.prefix, self.index)
        os.replace(self._tmp(), final)
        self.written.append(final)
        self.counts[final.name] = self.count
        self._sink, self.index, self.count = None, self.index + 1, 0

    def _record(self) -> None:
        if self.manifest and self.counts:
            update_manifest(self.folder, self.counts)
        self.counts = {}

    def close(self) -> list[Path]:
        """Finish the last shard and record the counts in manifest.json; return every shard written."""
        if self._sink is not None:
            self._finish()
        self._record()
        return self.written

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        else:
            if self._sink is not None:
                self._sink.close()
                self._tmp().unlink(missing_ok=True)
                self._sink = None
            self._record()
