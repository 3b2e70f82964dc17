"""Converters from the real datasets' raw layouts into the project's shard format (`datamodules.shard_format`).

`python -m datamodules.convert <name> --src RAW --out SHARDS [--split-list FILE] [--workers N] [--shard-size N]`;
one module per dataset family (`hypersim`, `vkitti2`, `marigold_eval`, `dsine_eval`), the shared `runner`
(deterministic input -> shard mapping, worker processes, progress bar, atomic shards, resume, skip report) and
`common` helpers. Each module's docstring states the raw layout it expects.
"""

from __future__ import annotations

from datamodules.convert import dsine_eval, hypersim, marigold_eval, vkitti2
from datamodules.convert.runner import Dataset, Report, run_conversion

DATASETS: dict[str, Dataset] = {
    d.name: d for d in [hypersim.DATASET, vkitti2.DATASET, *marigold_eval.DATASETS, *dsine_eval.DATASETS]
}

__all__ = ["DATASETS", "Dataset", "Report", "run_conversion"]
