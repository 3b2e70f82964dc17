"""One inference path for any image size: resize, pad, predict members, unpad, ensemble, resize back.

Sizes, initial latent, ensembling and output conventions follow docs/method.md §5.3-5.6. Resize and pad are
diffusers' `MarigoldImageProcessor` (the stock pipelines' own rules); everything stays on the model's device.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from torch import Tensor

from lightning_modules.core import GeometryCore
from lightning_modules.inference import InferenceSpec
from lightning_modules.tasks import Task

# Python's own once-per-location filtering is reset whenever a library edits the warning filters.
_warned_identical_members = False


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size with the longer edge = `resolution` (aspect kept, other side truncated); 0 keeps the native size."""
    if resolution < 0:
        raise ValueError(f"processing_resolution must be >= 0 (0 = native), got {resolution}")
    if resolution == 0:
        return height, width
    longest = max(height, width)
    return max(1, height * resolution // longest), max(1, width * resolution // longest)


class UNetCallCounter:
    """Counts UNet evaluations per sample (a batch of B counts B) with a forward pre-hook while active."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.calls = 0
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls += int(sample.shape[0])

    def __enter__(self) -> UNetCallCounter:
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def predict_latent(core: GeometryCore, task: Task, z_rgb: Tensor, spec: InferenceSpec) -> Tensor:
    """A prediction in model conventions for an encoded image latent (one member)."""
    z_0 = core.sample(z_rgb, spec)
    return task.from_decoded(core.decode(z_0.to(z_rgb.dtype)))


def _predict_members(
    core: GeometryCore,
    task: Task,
    images: Tensor,
    size: tuple[int, int],
    ensemble_size: int,
    spec: InferenceSpec,
    batch_size: int,
    bf16: bool,
) -> Tensor:
    """Members [B,K,C,h,w] (float32, on the model's device) at processing size in output conventions."""
    parameter = next(core.unet.parameters())
    device = parameter.device
    dtype = torch.float32 if bf16 else parameter.dtype
    chunks = []
    for chunk in images.split(batch_size):
        x = chunk.to(device=device, dtype=torch.float32)
        x = MarigoldImageProcessor.resize_antialias(x, size, "bilinear", is_aa=True) if x.shape[-2:] != size else x
        if x.shape[-2] % core.vae_scale_factor or x.shape[-1] % core.vae_scale_factor:
            x, padding = MarigoldImageProcessor.pad_image(x, core.vae_scale_factor)
        else:  # replicate-padding by zero pixels would still copy the image
            padding = (0, 0)
        x = x.mul(2).sub_(1).to(dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z_rgb = core.encode(x)  # once per chunk: members differ only in their initial latent
        members = []
        for k in range(ensemble_size):
            # Seeds per member, not per image: every image of the chunk gets the same member noise.
            member_spec = dataclasses.replace(spec, seed=spec.seed + k)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                prediction = predict_latent(core, task, z_rgb, member_spec)
            members.append(task.to_output(MarigoldImageProcessor.unpad_image(prediction.float(), padding)))
        chunks.append(torch.stack(members, dim=1))
    return torch.cat(chunks)


def predict(
    core: GeometryCore,
    task: Task,
    images: Tensor,
    processing_resolution: int = 768,
    ensemble_size: int = 1,
    spec: InferenceSpec | None = None,
    batch_size: int = 4,
    ensemble_options: dict[str, Any] | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Predict for RGB images [B,3,H,W] in [0,1], in the task's output conventions at the input size.

    Returns `{task.name: prediction [B,C,H,W], "uncertainty": [B,1,H,W] or None, "unet_calls": int}`, float32 on
    the model's device. Ensemble member k starts from the noise of seed `spec.seed + k`, the same for every image
    whatever its position in the batch (batching changes results only by float round-off). `ensemble_options` go
    to the task's `ensemble` (depth: `ensemble_depth` keywords, e.g. a `DEPTH_ENSEMBLE_PRESETS` entry); ensembling
    happens at processing resolution, as in Marigold.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    if ensemble_size < 1 or batch_size < 1:
        raise ValueError(f"ensemble_size and batch_size must be >= 1, got {ensemble_size} and {batch_size}")
    low, high = (float(v) for v in torch.aminmax(images))  # one pass
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"images must be in [0, 1] (got values in [{low:.3g}, {high:.3g}]; map [-1, 1] by (x + 1) / 2)"
        )
    global _warned_identical_members
    spec = spec or InferenceSpec()
    if ensemble_size > 1 and spec.init_latent == "zeros" and not _warned_identical_members:
        _warned_identical_members = True
        warnings.warn(
            "ensemble_size > 1 with init_latent='zeros': every member is identical (the seed only affects "
            "stochastic initial latents); use init_latent='gaussian' or 'pyramid' for a meaningful ensemble",
            stacklevel=2,
        )
    height, width = images.shape[-2:]
    size = processing_size(height, width, processing_resolution)
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad(), UNetCallCounter(core.unet) as counter:
            members = _predict_members(core, task, images, size, ensemble_size, spec, batch_size, bf16)
    finally:
        core.train(was_training)

    fused, uncertainties = [], []
    for image_members in members:
        prediction, uncertainty = image_members[0], None
        if ensemble_size > 1:
            prediction, uncertainty = task.ensemble(image_members, ensemble_options or {})
        fused.append(task.resize_output(prediction[None], (height, width)))
        if uncertainty is not None:
            uncertainties.append(task.resize_output_uncertainty(uncertainty[None], (height, width)))
    return {
        task.name: torch.cat(fused),
        "uncertainty": torch.cat(uncertainties) if uncertainties else None,
        "unet_calls": counter.calls,
    }
