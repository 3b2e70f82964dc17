"""Per-task conversions between decoded VAE images and predictions, and the task losses (RECIPE §1.6, §2.2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_modules.losses import affine_invariant_l1

TaskName = Literal["depth"]


class DepthTask:
    """Affine-invariant depth: decoded image -> channel mean clamped to [-1, 1] (near = -1, far = +1)."""

    name = "depth"

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        """Three-channel image in [-1, 1] that the diffusion objective encodes as its target latent."""
        return batch["depth_norm"].repeat(1, 3, 1, 1)

    def from_decoded(self, decoded: Tensor) -> Tensor:
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Affine-invariant L1 against the clamped metric depth, float32 inside."""
        return affine_invariant_l1(prediction, batch["depth_target"], batch["mask"])


def build_task(name: str) -> DepthTask:
    if name == "depth":
        return DepthTask()
    raise ValueError(f"unknown task {name!r}; available: 'depth'")


def valid_latent_mask(mask: Tensor, factor: int, channels: int) -> Tensor:
    """A latent cell is valid only if every pixel under it is valid (RECIPE §2.1 step 2)."""
    invalid = torch.nn.functional.max_pool2d((~mask).float(), kernel_size=factor, stride=factor)
    return (invalid < 0.5).expand(-1, channels, -1, -1)
