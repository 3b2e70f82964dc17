"""Training objectives: Marigold diffusion denoising, end-to-end fine-tuning at a fixed timestep (docs/method.md §2)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_modules.noise import annealed_strength, pyramid_noise
from lightning_modules.tasks import valid_latent_mask

if TYPE_CHECKING:
    from lightning_modules.module import GeometryEstimator


def masked_mse(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over valid elements only, in float32; 0 (with gradient) when nothing is valid."""
    with torch.autocast(device_type=output.device.type, enabled=False):
        error = (output.float() - target.float()) ** 2
        return (error * valid).sum() / valid.sum().clamp_min(1)


class Objective:
    """Computes the training loss of one micro-batch; returns (loss, extra scalars to log)."""

    def training_loss(self, model: "GeometryEstimator", batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class DiffusionObjective(Objective):
    """Marigold: noise the target latent at t ~ U{0..T-1}, regress the scheduler's target, MSE on valid cells.

    Args:
        multi_res_noise: use annealed multi-resolution (pyramid) noise instead of plain Gaussian noise.
        noise_strength: pyramid strength s0 (annealed as s0 * t / T when `annealed`).
        noise_levels: pyramid levels.
        annealed: scale the pyramid strength with the timestep.
    """

    def __init__(
        self,
        multi_res_noise: bool = True,
        noise_strength: float = 0.9,
        noise_levels: int = 10,
        annealed: bool = True,
    ) -> None:
        self.multi_res_noise = multi_res_noise
        self.noise_strength = noise_strength
        self.noise_levels = noise_levels
        self.annealed = annealed

    def training_loss(self, model: "GeometryEstimator", batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scheduler = model.noise_scheduler
        z_rgb = model.encode(batch["rgb"])
        z_0 = model.encode(model.task.target_image(batch))
        b = z_0.shape[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=z_0.device)
        if self.multi_res_noise:
            strength = (
                annealed_strength(t, scheduler.config.num_train_timesteps, self.noise_strength)
                if self.annealed
                else self.noise_strength
            )
            noise = pyramid_noise(z_0.shape, strength, levels=self.noise_levels, device=z_0.device, dtype=z_0.dtype)
        else:
            noise = torch.randn_like(z_0)
        z_t = scheduler.add_noise(z_0, noise, t)
        output = model.unet_forward(z_rgb, z_t, t)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = scheduler.get_velocity(z_0, noise, t)
        elif prediction_type == "epsilon":
            target = noise
        elif prediction_type == "sample":
            target = z_0
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
        cells = valid_latent_mask(model.task.valid_mask(batch), model.vae_scale_factor, z_0.shape[1])
        return masked_mse(output, target, cells), {"valid_latent_fraction": cells.float().mean()}


class E2EObjective(Objective):
    """E2E FT: fixed timestep, fixed noise, x0 from the model output, decode with gradient, task loss in pixels.

    Args:
        noise: initial latent at the fixed timestep: `zeros` (released models), `gaussian` or `pyramid`.
        timestep: the fixed timestep (999 in the paper).
        pyramid_strength: strength of the (non-annealed) pyramid noise.
    """

    def __init__(
        self,
        noise: Literal["zeros", "gaussian", "pyramid"] = "zeros",
        timestep: int = 999,
        pyramid_strength: float = 0.9,
    ) -> None:
        if noise not in ("zeros", "gaussian", "pyramid"):
            raise ValueError(f"noise must be zeros, gaussian or pyramid, got {noise!r}")
        self.noise = noise
        self.timestep = timestep
        self.pyramid_strength = pyramid_strength

    def initial_latent(self, like: Tensor) -> Tensor:
        if self.noise == "zeros":
            return torch.zeros_like(like)
        if self.noise == "gaussian":
            return torch.randn_like(like)
        return pyramid_noise(like.shape, self.pyramid_strength, device=like.device, dtype=like.dtype)

    def training_loss(self, model: "GeometryEstimator", batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        z_rgb = model.encode(batch["rgb"])
        z_t = self.initial_latent(z_rgb)
        t = torch.full((z_rgb.shape[0],), self.timestep, device=z_rgb.device, dtype=torch.long)
        output = model.unet_forward(z_rgb, z_t, t)
        z_0 = model.predicted_original(output, z_t, t)
        prediction = model.task.from_decoded(model.decode(z_0))
        loss = model.task.loss(prediction, batch)
        return loss, {}
