"""LR multiplier for `LambdaLR`: linear warm-up, exponential decay, stepped per optimiser update (docs/method.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupExponential:
    """f(n) = n/W for n < W; r^((n−W)/(T−W)) for W ≤ n < T; r for n ≥ T (n = optimiser updates taken)."""

    warmup_steps: int
    decay_steps: int
    final_ratio: float

    def __call__(self, step: int) -> float:
        n, w, t = max(int(step), 0), self.warmup_steps, self.decay_steps
        if n < w:
            return n / w
        if n < t:
            return self.final_ratio ** ((n - w) / (t - w))
        return self.final_ratio


def warmup_exponential_lambda(
    warmup_steps: int = 100, decay_steps: int = 20000, final_ratio: float = 0.01
) -> Callable[[int], float]:
    """Build the multiplier; a picklable callable object so LambdaLR state and DDP spawning keep working.

    warmup_steps=0 skips warm-up (f(0) = 1). Steps are not scaled by the process count.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps must be an int > warmup_steps ({warmup_steps}), got {decay_steps!r}")
    if not 0 < final_ratio <= 1:
        raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio!r}")
    return WarmupExponential(warmup_steps, decay_steps, float(final_ratio))
