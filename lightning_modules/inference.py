"""DDIM sampling in latent space with a chosen timestep spacing; the last step returns x0 (docs/method.md §5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from torch import Tensor

from lightning_modules.noise import pyramid_noise

Spacing = Literal["trailing", "leading", "linspace"]
InitLatent = Literal["zeros", "gaussian", "pyramid"]


@dataclass
class InferenceSpec:
    """How predictions are made in validation/test/predict: DDIM steps, spacing, initial latent, seed."""

    num_steps: int = 1
    spacing: Spacing = "trailing"
    init_latent: InitLatent = "zeros"
    seed: int = 1234


def inference_scheduler(noise_scheduler: SchedulerMixin, spacing: Spacing = "trailing") -> DDIMScheduler:
    """A DDIM scheduler sharing the training betas, with explicit spacing and no clipping, docs/method.md §9.2, §9.9."""
    return DDIMScheduler.from_config(
        noise_scheduler.config,
        timestep_spacing=spacing,
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=False,
    )


def initial_latent(shape: torch.Size, kind: InitLatent, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Initial latent for a batch; every sample gets the noise of `seed`, so a result never depends on its batch."""
    if kind == "zeros":
        return torch.zeros(shape, device=device, dtype=dtype)
    one = (1, *shape[1:])
    if kind == "gaussian":
        noise = torch.randn(one, generator=torch.Generator(device="cpu").manual_seed(seed))
    elif kind == "pyramid":
        noise = pyramid_noise(one, 0.9, generator=torch.Generator(device="cpu").manual_seed(seed))
    else:
        raise ValueError(f"unknown initial latent {kind!r}")
    return noise.expand(shape).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_latent(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    scheduler: DDIMScheduler,
    z_init: Tensor,
    num_steps: int,
) -> Tensor:
    """Run `num_steps` DDIM steps from `z_init`; `denoiser(z_t, t)` returns the raw model output.

    The final step returns the predicted x0 rather than DDIM's re-noised `prev_sample` (docs/method.md §5.2).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device=z_init.device)
    z = z_init
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        output = denoiser(z, t.expand(z.shape[0]))
        step = scheduler.step(output, t, z)
        if i == len(timesteps) - 1:
            return step.pred_original_sample
        z = step.prev_sample
    raise AssertionError("unreachable")
