"""Write shards atomically: a shard appears under its final name only when complete, so reruns resume."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds


def shard_path(folder: str | Path, prefix: str, index: int) -> Path:
    """`<folder>/<prefix>-NNNNNN.tar`."""
    return Path(folder) / f"{prefix}-{index:06d}.tar"


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
    a clean exit. On an exception the unfinished shard is deleted, so only complete shards ever exist.
    """

    def __init__(self, folder: str | Path, prefix: str, samples_per_shard: int, start_index: int = 0) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.folder, self.prefix, self.samples_per_shard = Path(folder), prefix, samples_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count = start_index, 0
        self.written: list[Path] = []
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
        self._sink, self.index, self.count = None, self.index + 1, 0

    def close(self) -> list[Path]:
        """Finish the last shard; return every shard written."""
        if self._sink is not None:
            self._finish()
        return self.written

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self._sink is not None:
            self._sink.close()
            self._tmp().unlink(missing_ok=True)
            self._sink = None
