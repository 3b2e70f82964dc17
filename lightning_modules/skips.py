"""Data skips as the streams report them in `batch["skipped"]` (the batch contract), summed over ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

# Column order of `batch["skipped"]`, as documented in datamodules/targets.py (the two sides meet only through the
# batch contract, so the names are repeated here; new reasons are appended there and here).
SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard", "truncated_shard", "missing_member", "bad_image", "bad_metadata", "size_mismatch",
    "bad_size", "bad_sample",
)  # fmt: skip


class SkipCounts(Metric):
    """Samples skipped by the data streams, per reason, summed over batches and (on compute) over ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(len(SKIP_REASONS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, skipped: Tensor) -> None:
        """Add a batch's `skipped` [B, R] (R may be shorter than SKIP_REASONS for older streams)."""
        total = skipped.reshape(-1, skipped.shape[-1]).sum(0).to(self.counts)
        self.counts[: total.numel()] += total[: len(SKIP_REASONS)]

    def compute(self) -> dict[str, Tensor]:
        return {reason: self.counts[i] for i, reason in enumerate(SKIP_REASONS)}
