"""Per-sample training targets (docs/method.md §4.3) and the horizontal flip (§4.4), as float32 torch tensors.

Output keys (the batch contract, before batching): `rgb` [3,H,W] in [-1, 1]; `depth` [1,H,W] raw metric depth
(0 = invalid), used by metrics; `depth_target` [1,H,W] depth clamped to its 2nd/98th percentiles with invalid
pixels set to the 98th (the E2E loss target, metres); `depth_norm` [1,H,W] = 2 (depth_target - q2) / (q98 - q2) - 1
clamped to [-1, 1] (near = -1; the diffusion target); `normals` [3,H,W] unit vectors, zeros where invalid or
absent; `mask` bool [1,H,W]; `key`, `source` strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

_QUANTILE_LIMIT = 16_000_000  # torch.quantile refuses larger inputs


def _quantiles(values: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Linear-interpolated quantiles like torch.quantile, also for inputs beyond its size limit."""
    if values.numel() <= _QUANTILE_LIMIT:
        q = torch.quantile(values, torch.tensor([low, high], dtype=values.dtype))
        return q[0], q[1]
    ordered = values.sort().values
    return _interpolated(ordered, low), _interpolated(ordered, high)


def _interpolated(ordered: Tensor, q: float) -> Tensor:
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def build_targets(
    sample: dict[str, Any], min_depth: float = 1e-5, max_depth: float = 80.0, vae_factor: int = 8
) -> dict[str, Any]:
    """Decoded sample (numpy, see shard_format) -> tensors of the batch contract.

    The valid range is the intersection of (min_depth, max_depth) with the sample's own `min_depth`/`max_depth`
    metadata, when present. A normals-only sample (`has_depth` false) keeps its stored mask and zero depth targets.
    """
    key = sample["key"]
    height, width = sample["depth"].shape
    if height % vae_factor or width % vae_factor:
        raise ValueError(
            f"{key}: image size {height}x{width} is not a multiple of {vae_factor}; resize or crop when converting"
        )
    rgb = torch.from_numpy(sample["rgb"]).permute(2, 0, 1).float() / 255 * 2 - 1
    depth = torch.from_numpy(np.ascontiguousarray(sample["depth"], dtype=np.float32))[None]
    mask = torch.from_numpy(np.asarray(sample["mask"], dtype=bool))[None]
    meta = sample.get("meta", {})
    has_depth = meta.get("has_depth", True)  # false: a normals-only sample, its stored mask is the normals' one
    low, high = max(min_depth, meta.get("min_depth", min_depth)), min(max_depth, meta.get("max_depth", max_depth))
    if has_depth:
        mask &= torch.isfinite(depth) & (depth > low) & (depth < high)
    depth = torch.where(mask, depth, torch.zeros_like(depth))

    target = torch.zeros_like(depth)
    normalised = torch.zeros_like(depth)
    if has_depth and mask.any():
        q2, q98 = _quantiles(depth[mask], 0.02, 0.98)
        if q98 > q2:
            target = torch.where(mask, depth.clamp(q2, q98), q98)
            normalised = (2 * (target - q2) / (q98 - q2) - 1).clamp(-1, 1)
        else:  # constant depth: no affine-invariant signal
            mask = torch.zeros_like(mask)
            depth = torch.zeros_like(depth)

    if "normals" in sample:
        normals = torch.from_numpy(np.ascontiguousarray(sample["normals"], dtype=np.float32)).permute(2, 0, 1)
        normals = torch.where(mask, normals, torch.zeros_like(normals))
    else:
        normals = torch.zeros(3, height, width)
    return {
        "key": key,
        "source": str(meta.get("source", "unknown")),
        "rgb": rgb,
        "depth": depth,
        "depth_target": target,
        "depth_norm": normalised,
        "normals": normals,
        "mask": mask,
    }


# Per batch key, the per-channel sign a horizontal flip applies after mirroring: the one place a target that is not a
# plain raster says how it transforms (normals: x points image-left, so n_x changes sign). A new target key whose
# values depend on the image's orientation adds its entry here (docs/extending.md).
FLIP_SIGNS: dict[str, tuple[float, ...]] = {"normals": (-1.0, 1.0, 1.0)}


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every raster left-right, then apply `FLIP_SIGNS` to the keys that have one."""
    flipped = {k: (v.flip(-1) if isinstance(v, Tensor) else v) for k, v in sample.items()}
    for key, signs in FLIP_SIGNS.items():
        if key in flipped:
            flipped[key] = flipped[key] * torch.tensor(signs).view(-1, 1, 1)
    return flipped
