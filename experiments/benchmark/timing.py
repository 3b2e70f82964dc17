"""Clocks that wait for the device, and the statistics every mode reports (median and spread over rounds)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait until queued device work is done (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """`time.perf_counter()` after the device has caught up."""
    sync(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    start = clock(device)
    fn()
    return clock(device) - start


@dataclass
class Stats:
    """Median, min and max of repeated measurements; spread = (max - min) / median."""

    median: float
    min: float
    max: float
    spread: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            raise ValueError("no measurements")
        median = statistics.median(values)
        return cls(
            median, min(values), max(values), (max(values) - min(values)) / median if median else 0.0, len(values)
        )

    def scaled(self, factor: float) -> Stats:
        """The same measurements in other units (e.g. seconds -> milliseconds)."""
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.spread, self.n)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each run once per round, the order rotated every round so that no run always goes first.

    Each run returns its own measurement (seconds); the result lists them per run name, in round order.
    """
    names = list(runs)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(runs[name]())
    return results
