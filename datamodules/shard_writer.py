"""Write shards atomically: a shard appears under its final name only when complete, so reruns resume."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds


class AtomicShardWriter:
    """Writes `<prefix>-NNNNNN.tar` files in `folder` via a temporary name and a rename."""

    def __init__(self, folder: str | Path, prefix: str) -> None:
        self.folder, self.prefix = Path(folder), prefix
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:06d}.tar"

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
