"""Test-time ensembling of predictions of one image: affine-aligned depth, averaged normals (docs/method.md §5.5)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

DepthReduction = Literal["median", "mean"]
NormalsReduction = Literal["closest", "mean"]

# Solver presets (docs/method.md §5.5, §9.17): results depend on them, so log the one used.
DEPTH_ENSEMBLE_PRESETS: dict[str, dict[str, float | int]] = {
    "diffusers": dict(max_iter=2, tol=1e-3, max_res=1024),
    "marigold_v1_0": dict(max_iter=2, tol=1e-3, max_res=50),
}


def _median(x: Tensor) -> Tensor:
    """True median over dim 0 (mean of the two middle values for even K; torch.median takes the lower one)."""
    ordered = x.sort(dim=0).values
    k = x.shape[0]
    return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])


def _reduce(aligned: Tensor, reduction: DepthReduction) -> tuple[Tensor, Tensor]:
    """Pixelwise centre and spread of aligned members: median + MAD, or mean + std."""
    if reduction == "median":
        centre = _median(aligned)
        return centre, _median((aligned - centre).abs())
    if reduction == "mean":
        return aligned.mean(dim=0), aligned.std(dim=0)
    raise ValueError(f"unknown depth reduction {reduction!r}; use 'median' or 'mean'")


def _downsample(members: Tensor, max_res: int) -> Tensor:
    height, width = members.shape[-2:]
    factor = max_res / max(height, width)
    if factor >= 1:
        return members
    size = (max(1, int(height * factor)), max(1, int(width * factor)))
    return F.interpolate(members, size=size, mode="nearest-exact")


def _initial_params(members: Tensor, shift_invariant: bool) -> np.ndarray:
    flat = members.flatten(1).double()
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    if shift_invariant:
        scale = 1.0 / (high - low).clamp_min(1e-6)
        return torch.cat([scale, -scale * low]).numpy()
    return (1.0 / high.clamp_min(1e-6)).numpy()


def _apply(members: Tensor, params: np.ndarray | Tensor, shift_invariant: bool) -> Tensor:
    k = members.shape[0]
    p = torch.as_tensor(params, dtype=members.dtype, device=members.device)
    scale = p[:k].view(k, 1, 1, 1)
    shift = p[k:].view(k, 1, 1, 1) if shift_invariant else 0.0
    return members * scale + shift


def ensemble_depth(
    members: Tensor,
    reduction: DepthReduction = "median",
    max_iter: int = 2,
    tol: float = 1e-3,
    max_res: int = 1024,
    regularizer: float = 0.02,
    scale_invariant: bool = True,
    shift_invariant: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Align K depth maps [K,1,H,W] by per-member scale/shift and reduce them to one [1,H,W] map + uncertainty.

    Defaults are the diffusers preset (BFGS max_iter 2, tol 1e-3, solved at <= 1024 px, lambda 0.02): the
    min/max initialisation already aligns members well, two iterations refine it without drifting towards the
    objective's collapsed optimum, and the preset is the one users compare against. Unlike diffusers, the cost is
    evaluated in float64 with its exact autograd gradient: diffusers' float32 finite differences are mostly noise
    and cost 2K + 1 evaluations per gradient.
    Output is min-max normalised to [0,1] (min pinned at 0 for scale-only; no alignment or normalisation for
    absolute depth); uncertainty (MAD or std) is divided by the same range. K = 1 returns the member unchanged
    with no uncertainty.
    """
    if members.ndim != 4 or members.shape[1] != 1:
        raise ValueError(f"expected depth members [K,1,H,W], got {tuple(members.shape)}")
    if shift_invariant and not scale_invariant:
        raise ValueError("shift-only invariant depth cannot be ensembled; use scale (and shift) invariance")
    if members.shape[0] == 1:
        return members[0], None
    work = members.float()
    if scale_invariant:
        with torch.inference_mode(False):  # validation/test run under inference mode; the solver needs autograd
            small = _downsample(work, max_res).double().clone()
            pair_i, pair_j = torch.triu_indices(members.shape[0], members.shape[0], offset=1)

        def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
            with torch.inference_mode(False), torch.enable_grad():
                p = torch.tensor(params, dtype=torch.float64, requires_grad=True)
                aligned = _apply(small, p, shift_invariant)
                flat = aligned.flatten(1)
                # Pairwise RMSE; the clamp keeps the gradient finite for identical members (sqrt'(0) is infinite).
                cost = (flat[pair_i] - flat[pair_j]).square().mean(dim=1).clamp_min(1e-24).sqrt().sum()
                centre, _ = _reduce(aligned, reduction)
                # Pulls the fused map towards [0,1]; without it every scale could shrink to 0 for a zero error.
                penalty = centre.min().abs() + (1 - centre.max()).abs()
                total = cost + regularizer * penalty
                (gradient,) = torch.autograd.grad(total, p)
            return float(total.detach()), gradient.numpy()

        init = _initial_params(small, shift_invariant)
        result = minimize(
            objective, init, jac=True, method="BFGS", tol=tol, options={"maxiter": max_iter, "disp": False}
        )
        params = result.x
        # Shrinking all members to a constant costs at most lambda while any disagreement costs more, so long
        # solves can drive scales through zero; such a solution falls back to the min/max initialisation.
        if not (np.isfinite(params).all() and (params[: members.shape[0]] > 0).all()):
            params = init
        work = _apply(work, params, shift_invariant)
    depth, uncertainty = _reduce(work, reduction)
    if scale_invariant:
        low = depth.min() if shift_invariant else depth.new_zeros(())
        span = (depth.max() - low).clamp_min(1e-6)
        depth, uncertainty = (depth - low) / span, uncertainty / span
    return depth.to(members.dtype), uncertainty.to(members.dtype)


def ensemble_normals(members: Tensor, reduction: NormalsReduction = "closest") -> tuple[Tensor, Tensor]:
    """Reduce K normal maps [K,3,H,W] to one unit map [3,H,W] and an angular uncertainty [1,H,W] in [0,1].

    The mean direction is the renormalised average; `closest` returns, per pixel, the member nearest to it
    (a real prediction rather than a blend). Uncertainty = mean angle to the mean direction / pi.
    """
    if members.ndim != 4 or members.shape[1] != 3:
        raise ValueError(f"expected normal members [K,3,H,W], got {tuple(members.shape)}")
    unit = F.normalize(members.float(), dim=1, eps=1e-6)
    mean = F.normalize(unit.mean(dim=0, keepdim=True), dim=1, eps=1e-6)
    cos = (unit * mean).sum(dim=1, keepdim=True)
    # atan2 of (|cross|, dot) is exact near 0 where arccos of a rounded cosine is not.
    sin = torch.linalg.cross(unit, mean.expand_as(unit), dim=1).norm(dim=1, keepdim=True)
    uncertainty = torch.atan2(sin, cos).mean(dim=0) / math.pi
    if reduction == "mean":
        normals = mean[0]
    elif reduction == "closest":
        index = cos.argmax(dim=0, keepdim=True).expand(1, 3, -1, -1)
        normals = unit.gather(0, index)[0]
    else:
        raise ValueError(f"unknown normals reduction {reduction!r}; use 'closest' or 'mean'")
    return normals.to(members.dtype), uncertainty.to(members.dtype)
