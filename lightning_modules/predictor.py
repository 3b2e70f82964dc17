"""One inference path for any image size: resize, pad, predict members, unpad, ensemble, resize back.

Sizes, initial latent, ensembling and output conventions follow docs/method.md §5.3-5.6.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.ensemble import DepthReduction, NormalsReduction, ensemble_depth, ensemble_normals
from lightning_modules.inference import InferenceSpec

if TYPE_CHECKING:
    from lightning_modules.module import GeometryEstimator

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


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing; a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def pad_to_multiple(x: Tensor, factor: int) -> Tensor:
    """Replicate-pad bottom/right so height and width are multiples of `factor` (diffusers convention)."""
    pad_h, pad_w = -x.shape[-2] % factor, -x.shape[-1] % factor
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


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


def _predict_members(
    model: GeometryEstimator,
    images: Tensor,
    size: tuple[int, int],
    ensemble_size: int,
    spec: InferenceSpec,
    batch_size: int,
    bf16: bool,
) -> Tensor:
    """Members [B,K,C,h,w] (float32, CPU) at processing size in output conventions (depth in [0,1])."""
    parameter = next(model.parameters())
    device = parameter.device
    dtype = torch.float32 if bf16 else parameter.dtype
    chunks = []
    for chunk in images.split(batch_size):
        x = pad_to_multiple(resize(chunk.to(device=device, dtype=torch.float32), size), model.vae_scale_factor)
        x = (x * 2 - 1).to(dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z_rgb = model.encode(x)  # once per chunk: members differ only in their initial latent
        members = []
        for k in range(ensemble_size):
            # Seeds per member, not per image: every image of the chunk gets the same member noise.
            member_spec = dataclasses.replace(spec, seed=spec.seed + k)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                prediction = model.predict_from_latent(z_rgb, member_spec)
            prediction = prediction[..., : size[0], : size[1]].float().cpu()
            members.append((prediction + 1) / 2 if model.task.name == "depth" else prediction)
        chunks.append(torch.stack(members, dim=1))
    return torch.cat(chunks)


def predict(
    model: GeometryEstimator,
    images: Tensor,
    processing_resolution: int = 768,
    ensemble_size: int = 1,
    spec: InferenceSpec | None = None,
    batch_size: int = 4,
    depth_reduction: DepthReduction = "median",
    normals_reduction: NormalsReduction = "closest",
    depth_ensemble_options: dict[str, Any] | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Predict depth ([B,1,H,W] in [0,1], 0 = near) or unit normals ([B,3,H,W]) for RGB images [B,3,H,W] in [0,1].

    Returns `{task: prediction, "uncertainty": [B,1,H,W] or None, "unet_calls": int}`, tensors float32 on CPU.
    Ensemble members use seeds `spec.seed + k`; with a stochastic initial latent an image's noise also depends on
    its position within a batch of `batch_size` images. `depth_ensemble_options` go to `ensemble_depth`
    (e.g. a `DEPTH_ENSEMBLE_PRESETS` entry); ensembling happens at processing resolution, as in Marigold.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    if ensemble_size < 1 or batch_size < 1:
        raise ValueError(f"ensemble_size and batch_size must be >= 1, got {ensemble_size} and {batch_size}")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (got values in [{low:.3g}, {high:.3g}]; map [-1, 1] by (x + 1) / 2)")
    global _warned_identical_members
    spec = spec or model.inference
    if ensemble_size > 1 and spec.init_latent == "zeros" and not _warned_identical_members:
        _warned_identical_members = True
        warnings.warn(
            "ensemble_size > 1 with init_latent='zeros': every member is identical (the seed only affects "
            "stochastic initial latents); use init_latent='gaussian' or 'pyramid' for a meaningful ensemble",
            stacklevel=2,
        )
    height, width = images.shape[-2:]
    size = processing_size(height, width, processing_resolution)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), UNetCallCounter(model.unet) as counter:
            members = _predict_members(model, images, size, ensemble_size, spec, batch_size, bf16)
    finally:
        model.train(was_training)

    fused, uncertainties = [], []
    for image_members in members:
        prediction, uncertainty = image_members[0], None
        if model.task.name == "depth":
            if ensemble_size > 1:
                options = depth_ensemble_options or {}
                prediction, uncertainty = ensemble_depth(image_members, depth_reduction, **options)
            prediction = resize(prediction[None], (height, width)).clamp(0, 1)
        else:
            if ensemble_size > 1:
                prediction, uncertainty = ensemble_normals(image_members, normals_reduction)
            prediction = F.normalize(resize(prediction[None], (height, width)), dim=1, eps=1e-6)
        fused.append(prediction)
        if uncertainty is not None:
            uncertainties.append(resize(uncertainty[None], (height, width)).clamp_min(0))
    return {
        model.task.name: torch.cat(fused),
        "uncertainty": torch.cat(uncertainties) if uncertainties else None,
        "unet_calls": counter.calls,
    }
