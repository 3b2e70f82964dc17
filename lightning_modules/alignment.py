"""Per-image least-squares scale/shift alignment of affine-invariant depth (docs/method.md §2.2.1, §6.1)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AlignDownsample = Literal["upstream_width", "isotropic"]


def _solve(p: Tensor, g: Tensor, m: Tensor, fallback_mean: bool) -> tuple[Tensor, Tensor]:
    """Closed-form per-image fit of s·p + t ≈ g over mask m (all [B,1,H,W], same float dtype)."""
    dims = tuple(range(1, p.dim()))
    p, g = torch.where(m, p, 0), torch.where(m, g, 0)  # masked garbage (NaN/inf) must not reach sums or grads
    mf = m.to(p.dtype)
    n = mf.sum(dims)
    n_safe = n.clamp(min=1)
    # Shift by a detached valid pixel and centre before summing: mathematically the same normal equations as
    # a00·a11 − a01² etc., but a constant prediction gives det == 0 exactly instead of float round-off noise.
    p0 = torch.where(m, p, -torch.inf).amax(dims).detach()
    p0 = torch.where(n > 0, p0, 0).view(-1, *[1] * len(dims))
    q = (p - p0) * mf
    q_mean = (q.sum(dims) / n_safe).view_as(p0)
    g_mean = g.sum(dims) / n_safe
    qc = (q - q_mean) * mf
    var = (qc * qc).sum(dims)  # det / a11
    valid = var > 0
    s = torch.where(valid, (qc * g).sum(dims) / torch.where(valid, var, 1), 0)
    t = torch.where(valid, g_mean - s * (q_mean.flatten() + p0.flatten()), g_mean if fallback_mean else 0)
    return s, t


def least_squares_scale_shift(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Differentiable float32 per-image scale/shift [B] minimising Σ_mask (s·pred + t − target)²; s = t = 0 if det ≤ 0.

    Degenerate images (fewer than two distinct valid predictions, including empty masks) get s = t = 0 as in
    docs/method.md §2.2.1; s and t are not detached and the sign of s is free.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return _solve(pred.float(), target.float(), mask.bool().expand_as(pred), fallback_mean=False)


def _downsample_isotropic(x: Tensor, max_res: int) -> Tensor:
    """Nearest-neighbour resize of [B,C,H,W] so that the longest side is max_res."""
    h, w = x.shape[-2:]
    scale = max_res / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="nearest")


def _downsample_upstream_width(x: Tensor, max_res: int) -> Tensor:
    """Marigold's evaluation resize (docs/method.md §6.1): nearest by min(max_res/H, max_res/W) of the width only."""
    h, w = x.shape[-2:]
    # [H, W] read as (N, C, L) keeps every row and maps column j to floor(j / s), as the published ETH3D rows did.
    rows = F.interpolate(x.reshape(-1, h, w), scale_factor=min(max_res / h, max_res / w), mode="nearest")
    return rows.reshape(*x.shape[:-1], rows.shape[-1])


@torch.no_grad()
def align_depth_lstsq(
    pred: Tensor, gt: Tensor, mask: Tensor, max_res: int | None = None, downsample: AlignDownsample = "upstream_width"
) -> Tensor:
    """Evaluation alignment: per image fit [pred, 1]·[s, t] ≈ gt over mask (float64), return s·pred + t in float32.

    If max_res is set and max(H, W) > max_res, the fit uses nearest-downsampled copies of pred, gt and mask and
    is applied at full resolution: `upstream_width` subsamples only the width by min(max_res/H, max_res/W) as
    Marigold's evaluation does (ETH3D rule, docs/method.md §6.1), `isotropic` resizes both sides to long edge
    max_res. The scale sign is free. Images whose fit is degenerate (< 2 distinct valid predictions, or no valid
    pixel) get s = 0, t = mean valid gt (0 if none) — the fitted values of the minimum-norm lstsq solution — so
    no NaN is produced.
    """
    resize = {"upstream_width": _downsample_upstream_width, "isotropic": _downsample_isotropic}.get(downsample)
    if resize is None:
        raise ValueError(f"align downsample must be 'upstream_width' or 'isotropic', got {downsample!r}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, g, m = pred.float(), gt.float(), mask.bool().expand_as(pred)
        ps, gs, ms = p, g, m
        if max_res is not None and max(p.shape[-2:]) > max_res:
            ps, gs, ms = resize(p, max_res), resize(g, max_res), resize(m.float(), max_res).bool()
        s, t = _solve(ps.double(), gs.double(), ms, fallback_mean=True)
        shape = (-1,) + (1,) * (p.dim() - 1)
        return (s.view(shape) * p.double() + t.view(shape)).float()
