"""Multi-resolution ("pyramid") training noise with optional timestep annealing (docs/method.md §2.1.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def annealed_strength(timesteps: Tensor, num_train_timesteps: int = 1000, s0: float = 0.9) -> Tensor:
    """Per-sample pyramid strength s0·t/T (float32), so the pyramid vanishes at small t."""
    return s0 * timesteps.float() / num_train_timesteps


def pyramid_noise(
    shape: tuple[int, ...] | torch.Size,
    strength: float | Tensor,
    levels: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian noise plus upsampled coarser Gaussians weighted strength**i, divided by its global std.

    shape is (B, C, H, W); strength is a float or a per-sample tensor [B]. Per level i a fresh r ~ U[2, 4) is
    drawn (one per level, shared by the batch, from `generator`); h, w shrink compoundingly by r**i; level 0 adds
    a second full-resolution Gaussian with weight 1 (strength**0 = 1, also for strength 0). Stops after the level
    where h or w reaches 1. Sampled in float32 on `device` (default: the generator's device) and cast to dtype.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    b, c, h, w = shape
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        s = torch.as_tensor(strength, dtype=torch.float32, device=device)
        s = s.view(-1, 1, 1, 1) if s.dim() > 0 else s
        eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        for i in range(levels):
            r = 2 + 2 * torch.rand((), generator=generator, device=device).item()
            h, w = max(1, math.floor(h / r**i)), max(1, math.floor(w / r**i))
            coarse = torch.randn((b, c, h, w), generator=generator, device=device, dtype=torch.float32)
            eps = eps + F.interpolate(coarse, size=tuple(shape[-2:]), mode="bilinear", align_corners=False) * s**i
            if h == 1 or w == 1:
                break
        return (eps / eps.std()).to(dtype)
