"""Training objectives: Marigold diffusion denoising, end-to-end fine-tuning at a fixed timestep (docs/method.md §2).

An objective sees the model core and the task only. Every constructor argument is kept as an attribute of the same
name, so a checkpoint stores the objective as `{"class_path": ..., "init_args": ...}` (`objective_config`) and
`build_objective` rebuilds it on load. (Plain classes, not dataclasses: jsonargparse parses a dataclass-typed
argument as a fixed group of fields and would refuse `class_path` subclasses in configs.)
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.core import GeometryCore
from lightning_modules.noise import annealed_strength, pyramid_noise
from lightning_modules.tasks import Task


def masked_mse(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over valid elements only, in float32; 0 (with gradient) when nothing is valid."""
    with torch.autocast(device_type=output.device.type, enabled=False):
        error = (output.float() - target.float()) ** 2
        return (error * valid).sum() / valid.sum().clamp_min(1)


def valid_latent_mask(mask: Tensor, factor: int, channels: int) -> Tensor:
    """A latent cell is valid only if every pixel under it is valid (docs/method.md §2.1 step 2)."""
    invalid = torch.nn.functional.max_pool2d((~mask).float(), kernel_size=factor, stride=factor)
    return (invalid < 0.5).expand(-1, channels, -1, -1)


class Objective:
    """Computes the training loss of one micro-batch; returns (loss, extra scalars to log)."""

    def training_loss(
        self, core: GeometryCore, task: Task, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
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
        self, multi_res_noise: bool = True, noise_strength: float = 0.9, noise_levels: int = 10, annealed: bool = True
    ) -> None:
        self.multi_res_noise = multi_res_noise
        self.noise_strength = noise_strength
        self.noise_levels = noise_levels
        self.annealed = annealed

    def training_loss(
        self, core: GeometryCore, task: Task, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z_rgb = core.encode(batch["rgb"])
        z_0 = core.encode(task.target_image(batch))
        steps = core.num_train_timesteps
        t = torch.randint(0, steps, (z_0.shape[0],), device=z_0.device)
        if self.multi_res_noise:
            strength = annealed_strength(t, steps, self.noise_strength) if self.annealed else self.noise_strength
            noise = pyramid_noise(z_0.shape, strength, levels=self.noise_levels, device=z_0.device, dtype=z_0.dtype)
        else:
            noise = torch.randn_like(z_0)
        output = core.denoise(z_rgb, core.add_noise(z_0, noise, t), t)
        target = core.training_target(z_0, noise, t)
        cells = valid_latent_mask(task.valid_mask(batch), core.vae_scale_factor, z_0.shape[1])
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

    def training_loss(
        self, core: GeometryCore, task: Task, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z_rgb = core.encode(batch["rgb"])
        z_t = self.initial_latent(z_rgb)
        t = torch.full((z_rgb.shape[0],), self.timestep, device=z_rgb.device, dtype=torch.long)
        z_0 = core.predicted_original(core.denoise(z_rgb, z_t, t), z_t, t)
        return task.loss(task.from_decoded(core.decode(z_0)), batch), {}


def objective_config(objective: Objective) -> dict[str, Any]:
    """`{"class_path", "init_args"}` of an objective, the form configs and checkpoints store."""
    cls = type(objective)
    names = [
        n
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD
    ]
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": {n: getattr(objective, n) for n in names},
    }


def build_objective(spec: Objective | dict[str, Any] | None) -> Objective:
    """An objective from itself, from `objective_config`'s form (a checkpoint's hparams), or the default (E2E)."""
    if spec is None:
        return E2EObjective()
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError(f"objective must be an Objective or a {{class_path, init_args}} mapping, got {spec!r}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"{spec['class_path']!r} is not an Objective subclass")
    return cls(**(spec.get("init_args") or {}))
