"""DDIM timestep tables (docs/method.md §5.1) and the x0-at-the-last-step rule of `sample_latent` (§5.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.components import sd2_noise_scheduler
from lightning_modules.inference import inference_scheduler, sample_latent

T, OFFSET = 1000, 1


def expected(spacing: str, n: int) -> list[int]:
    """The formulas of the docs/method.md §5.1 table, written independently of diffusers."""
    if spacing == "leading":
        return [(T // n) * k + OFFSET for k in reversed(range(n))]
    if spacing == "trailing":
        return [int(v) - 1 for v in np.round(np.arange(T, 0, -T / n))]
    return [int(v) for v in np.round(np.linspace(0, T - 1, n))[::-1]]


def timesteps(spacing: str, n: int) -> list[int]:
    scheduler = inference_scheduler(sd2_noise_scheduler(), spacing)
    scheduler.set_timesteps(n)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 4, 10, 50])
def test_full_table_matches_formulas(spacing: str, n: int) -> None:
    assert timesteps(spacing, n) == expected(spacing, n)


@pytest.mark.parametrize(
    "spacing, n, literal",
    [
        ("leading", 1, [1]),
        ("trailing", 1, [999]),
        ("linspace", 1, [0]),
        ("leading", 2, [501, 1]),
        ("trailing", 2, [999, 499]),
        ("linspace", 2, [999, 0]),
        ("leading", 4, [751, 501, 251, 1]),
        ("trailing", 4, [999, 749, 499, 249]),
        ("linspace", 4, [999, 666, 333, 0]),
    ],
)
def test_short_rows_literal(spacing: str, n: int, literal: list[int]) -> None:
    assert timesteps(spacing, n) == literal


@pytest.mark.parametrize(
    "spacing, n, head, tail",
    [
        ("leading", 10, [901, 801], [101, 1]),
        ("trailing", 10, [999, 899], [199, 99]),
        ("linspace", 10, [999, 888], [111, 0]),
        ("leading", 50, [981, 961], [21, 1]),
        ("trailing", 50, [999, 979], [39, 19]),
        ("linspace", 50, [999, 979, 958, 938], [20, 0]),
    ],
)
def test_long_rows_ends_literal(spacing: str, n: int, head: list[int], tail: list[int]) -> None:
    steps = timesteps(spacing, n)
    assert len(steps) == n
    assert steps[: len(head)] == head and steps[-len(tail) :] == tail


class RecordingDenoiser:
    """Fake v-prediction model: a fixed function of the input, recording the timesteps it is called with."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.tolist())
        return 0.5 * z + 0.1 * (t.float() / 1000).view(-1, 1, 1, 1) + 0.3


def test_single_trailing_step_runs_once_at_999_and_returns_x0() -> None:
    scheduler = inference_scheduler(sd2_noise_scheduler(), "trailing")
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    denoiser = RecordingDenoiser()
    out = sample_latent(denoiser, scheduler, z, num_steps=1)
    assert denoiser.calls == [[999, 999]]
    alpha_bar = scheduler.alphas_cumprod[999]
    assert torch.isclose(alpha_bar, torch.tensor(0.0046601), atol=1e-6)  # SD2, not zero-SNR (docs/method.md §9.5)
    v = denoiser(z, torch.full((2,), 999))
    x0 = alpha_bar.sqrt() * z - (1 - alpha_bar).sqrt() * v
    torch.testing.assert_close(out, x0)


def test_four_steps_return_x0_of_the_last_step_not_prev_sample() -> None:
    scheduler = inference_scheduler(sd2_noise_scheduler(), "trailing")
    z_init = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    denoiser = RecordingDenoiser()
    out = sample_latent(denoiser, scheduler, z_init, num_steps=4)
    assert [c[0] for c in denoiser.calls] == [999, 749, 499, 249]

    # Replay the same steps by hand with a fresh scheduler.
    replay = inference_scheduler(sd2_noise_scheduler(), "trailing")
    replay.set_timesteps(4)
    z = z_init
    for t in replay.timesteps:
        step = replay.step(denoiser(z, t.expand(1)), t, z)
        z = step.prev_sample
    torch.testing.assert_close(out, step.pred_original_sample)
    assert (out - step.prev_sample).abs().max() > 1e-3  # set_alpha_to_one=False re-noises the last prev_sample
