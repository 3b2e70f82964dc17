"""Per-sample training targets (docs/method.md §4.3) and the horizontal flip (§4.4), as float32 torch tensors.

Output keys (the batch contract, before batching): `rgb` [3,H,W] in [-1, 1]; `depth` [1,H,W] raw metric depth
(0 = invalid), used by metrics; `depth_target` [1,H,W] depth clamped to its 2nd/98th percentiles with invalid
pixels set to the 98th (the E2E loss target, metres); `depth_norm` [1,H,W] = 2 (depth_target - q2) / (q98 - q2) - 1
clamped to [-1, 1] (near = -1; the diffusion target); `normals` [3,H,W] unit vectors, zeros where invalid or
absent; `mask` bool [1,H,W]; `key`, `source` strings.

The streams (datamodules.streams) add `skipped`: int64 [len(SKIP_REASONS)] per sample, [B, len(SKIP_REASONS)] per
batch: column j counts the samples lost for reason `SKIP_REASONS[j]` by this dataloader worker's stream just before
(since the previous sample it yielded), so `batch["skipped"].sum(0)` is what the batch's worker skipped since its
previous batch, and summing it over all batches of a pass counts every skip once (shard-level skips of a
validation pass are counted by the one worker that reads the shard, or by rank 0 in a key-filtered pass; padding samples may carry counts, so sum before dropping padding).
Counts are samples lost (a truncated shard counts every sample after the cut; an unreadable shard the samples its
manifest lists, else 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.shard_format import SampleFormatError

# Why data was skipped, in the column order of the batch's `skipped` counts (the batch contract; a consumer that must
# not import datamodules copies this tuple). Append new reasons at the end.
SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard",  # a shard that cannot be opened or read at all (missing, not a tar, empty)
    "truncated_shard",  # samples lost after the point where a shard's tar stops (cut short or damaged)
    "missing_member",  # a sample without rgb.png, depth.png, mask.png or json
    "bad_image",  # an undecodable PNG or the wrong kind (8-bit depth.png, RGB mask.png)
    "bad_metadata",  # unusable json: NaN / non-positive depth_scale, non-numeric min/max depth, ...
    "size_mismatch",  # rasters of one sample with different sizes
    "bad_size",  # a training image whose size is not a multiple of the VAE factor (8)
    "bad_sample",  # any other violation of the shard format
)


def _quantiles(values: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """torch.quantile's linear-interpolated quantiles, bit for bit, by selection instead of a full sort.

    `np.partition` finds the four order statistics in linear time (torch.quantile sorts: 4x slower at 480x640, and
    it refuses inputs over 16 M values); `torch.lerp` interpolates them the way torch.quantile does.
    """
    # torch.quantile's arithmetic: ranks in the values' dtype, floor and ceil, lerp by the fractional part
    ranks = torch.tensor([low, high], dtype=values.dtype) * (values.numel() - 1)
    below, above = ranks.long(), ranks.ceil().long()
    indices = sorted(set(below.tolist() + above.tolist()))
    ordered = torch.from_numpy(np.partition(values.detach().cpu().numpy().ravel(), indices))
    q = torch.lerp(ordered[below], ordered[above], ranks - below)
    return q[0], q[1]


def build_targets(
    sample: dict[str, Any],
    min_depth: float = 1e-5,
    max_depth: float = 80.0,
    vae_factor: int = 8,
    with_normals: bool = True,
) -> dict[str, Any]:
    """Decoded sample (numpy, see shard_format) -> tensors of the batch contract.

    The valid range is the intersection of (min_depth, max_depth) with the sample's own `min_depth`/`max_depth`
    metadata, when present. A normals-only sample (`has_depth` false) keeps its stored mask and zero depth targets.
    `with_normals`: a `normals` entry (zeros where the sample has none); False leaves it out, so a depth run neither
    builds, flips, collates nor ships three planes of zeros (a third of the batch's bytes).
    """
    key = sample["key"]
    height, width = sample["depth"].shape
    if height % vae_factor or width % vae_factor:
        raise SampleFormatError(
            f"{key}: image size {height}x{width} is not a multiple of {vae_factor}; resize or crop when converting",
            "bad_size",
        )
    # channels first while still uint8: the float maths then runs on contiguous memory
    rgb = torch.from_numpy(sample["rgb"]).permute(2, 0, 1).contiguous().float().mul_(2 / 255).sub_(1)
    depth = torch.from_numpy(np.ascontiguousarray(sample["depth"], dtype=np.float32))[None]
    mask = torch.from_numpy(np.array(sample["mask"], dtype=bool))[None]  # a copy: `&=` below must not edit the input
    meta = sample.get("meta", {})
    has_depth = meta.get("has_depth", True)  # false: a normals-only sample, its stored mask is the normals' one
    own_low, own_high = meta.get("min_depth"), meta.get("max_depth")  # null = absent (checked by decode_sample)
    low = min_depth if own_low is None else max(min_depth, own_low)
    high = max_depth if own_high is None else min(max_depth, own_high)
    if has_depth:
        mask &= torch.isfinite(depth) & (depth > low) & (depth < high)
    depth = torch.where(mask, depth, torch.zeros_like(depth))

    target = torch.zeros_like(depth)
    normalised = torch.zeros_like(depth)
    if has_depth and mask.any():
        q2, q98 = _quantiles(torch.from_numpy(depth.numpy()[mask.numpy()]), 0.02, 0.98)  # numpy indexes 3x faster
        if q98 > q2:
            target = torch.where(mask, depth.clamp(q2, q98), q98)
            normalised = (target - q2).mul_(2).div_(q98 - q2).sub_(1).clamp_(-1, 1)  # 2 (t - q2) / (q98 - q2) - 1
        else:  # constant depth: no affine-invariant signal
            mask = torch.zeros_like(mask)
            depth = torch.zeros_like(depth)

    targets = {
        "key": key,
        "source": str(meta.get("source", "unknown")),
        "rgb": rgb,
        "depth": depth,
        "depth_target": target,
        "depth_norm": normalised,
        "mask": mask,
    }
    if with_normals and "normals" in sample:
        normals = np.ascontiguousarray(np.asarray(sample["normals"], dtype=np.float32).transpose(2, 0, 1))
        targets["normals"] = torch.where(mask, torch.from_numpy(normals), 0.0)
    elif with_normals:
        targets["normals"] = torch.zeros(3, height, width)
    return targets


def no_skips() -> Tensor:
    """A `skipped` row with nothing skipped."""
    return torch.zeros(len(SKIP_REASONS), dtype=torch.long)


def skip_row(counts: dict[str, int]) -> Tensor:
    """Counts by reason -> a `skipped` row (reasons outside SKIP_REASONS are an error)."""
    unknown = set(counts) - set(SKIP_REASONS)
    if unknown:
        raise ValueError(f"unknown skip reasons {sorted(unknown)}; known: {SKIP_REASONS}")
    return torch.tensor([int(counts.get(reason, 0)) for reason in SKIP_REASONS], dtype=torch.long)


def skip_totals(skipped: Tensor) -> dict[str, int]:
    """A `skipped` row or batch [B, R] -> {reason: count} of the reasons with a count (summed over samples)."""
    totals = skipped.reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, totals) if n}


def describe_skips(totals: dict[str, int]) -> str:
    """{reason: count} -> "3: 2 bad_image, 1 truncated_shard" (largest first), "none" when empty."""
    total = sum(totals.values())
    if not total:
        return "none"
    parts = sorted(((n, r) for r, n in totals.items() if n), key=lambda item: (-item[0], item[1]))
    return f"{total}: " + ", ".join(f"{n} {r}" for n, r in parts)


# Per batch key, the per-channel sign a horizontal flip applies after mirroring: the one place a target that is not a
# plain raster says how it transforms (normals: x points image-left, so n_x changes sign). A new target key whose
# values depend on the image's orientation adds its entry here (docs/extending.md).
FLIP_SIGNS: dict[str, tuple[float, ...]] = {"normals": (-1.0, 1.0, 1.0)}


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every raster left-right, then apply `FLIP_SIGNS` to the keys that have one."""
    flipped = {k: (v.flip(-1) if isinstance(v, Tensor) else v) for k, v in sample.items()}
    for key, signs in FLIP_SIGNS.items():
        if key in flipped:
            flipped[key] = flipped[key].mul_(torch.tensor(signs).view(-1, 1, 1))  # the flip made a copy
    return flipped
