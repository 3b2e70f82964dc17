"""Test-time ensembling of predictions of one image: affine-aligned depth, averaged normals (docs/method.md §5.5)."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

DepthReduction = Literal["median", "mean"]
NormalsReduction = Literal["closest", "mean"]
MedianRule = Literal["lower", "midpoint"]
Solver = Literal["float32_finite_difference", "float64_autograd"]

# Keyword arguments of `ensemble_depth` (docs/method.md §5.5); results depend on them, so log the name used.
# `reduction` stays out of the presets: it is the caller's choice and every preset supports both.
DEPTH_ENSEMBLE_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' MarigoldDepthPipeline.ensemble_depth, reproduced to float round-off.
    "diffusers": dict(
        solver="float32_finite_difference", median="lower", max_iter=2, tol=1e-3, max_res=1024, regularizer=0.02
    ),
    # Our exact-gradient solve of the same objective with a midpoint median (the behaviour before issue 10).
    "exact_gradient": dict(
        solver="float64_autograd", median="midpoint", max_iter=2, tol=1e-3, max_res=1024, regularizer=0.02
    ),
    # Marigold v1.0 pipeline's solver settings on the diffusers objective (v1.0's own objective differs, §5.5).
    "marigold_v1_0": dict(
        solver="float32_finite_difference", median="lower", max_iter=2, tol=1e-3, max_res=50, regularizer=0.02
    ),
}


def _median(x: Tensor, rule: MedianRule) -> Tensor:
    """Median over dim 0: `lower` middle value for even K (torch.median), or `midpoint` of the two middle values."""
    if rule == "lower":
        return x.median(dim=0).values
    if rule != "midpoint":
        raise ValueError(f"unknown median rule {rule!r}; use 'lower' or 'midpoint'")
    ordered = x.sort(dim=0).values
    k = x.shape[0]
    return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])


def _reduce(aligned: Tensor, reduction: DepthReduction, rule: MedianRule) -> tuple[Tensor, Tensor]:
    """Pixelwise centre and spread of aligned members: median + MAD, or mean + std."""
    if reduction == "median":
        centre = _median(aligned, rule)
        return centre, _median((aligned - centre).abs(), rule)
    if reduction == "mean":
        return aligned.mean(dim=0), aligned.std(dim=0)
    raise ValueError(f"unknown depth reduction {reduction!r}; use 'median' or 'mean'")


def _downsample(members: Tensor, max_res: int | None) -> Tensor:
    """Nearest-exact resize to long edge max_res with integer-floored sizes (diffusers' resize_to_max_edge rule)."""
    height, width = members.shape[-2:]
    if max_res is None or max(height, width) <= max_res:
        return members
    size = (max(1, height * max_res // max(height, width)), max(1, width * max_res // max(height, width)))
    return F.interpolate(members, size=size, mode="nearest-exact")


def _initial_params(members: Tensor, shift_invariant: bool) -> np.ndarray:
    """Min/max initialisation in the members' dtype (float32 for diffusers), returned as float64 [scales, shifts]."""
    flat = members.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    if shift_invariant:
        scale = 1.0 / (high - low).clamp_min(1e-6)
        return torch.cat([scale, -scale * low]).cpu().double().numpy()
    return (1.0 / high.clamp_min(1e-6)).cpu().double().numpy()


def _apply(members: Tensor, params: np.ndarray | Tensor, shift_invariant: bool) -> Tensor:
    """s_k·p_k (+ t_k) with the parameters cast to the members' dtype, as diffusers casts them."""
    k = members.shape[0]
    p = torch.as_tensor(params).to(members)
    scaled = members * p[:k].view(k, 1, 1, 1)
    return scaled + p[k:].view(k, 1, 1, 1) if shift_invariant else scaled


def alignment_cost(
    members: Tensor,
    params: np.ndarray | Tensor,
    reduction: DepthReduction = "median",
    median: MedianRule = "lower",
    regularizer: float = 0.02,
    shift_invariant: bool = True,
) -> Tensor:
    """Differentiable ensembling objective Σ_{k<l} RMSE(p'_k, p'_l) + λ(|min m| + |1 − max m|) in float64."""
    aligned = _apply(members.double(), params, shift_invariant)
    flat = aligned.flatten(1)
    pair_i, pair_j = torch.triu_indices(members.shape[0], members.shape[0], offset=1, device=members.device)
    # The clamp keeps the gradient finite for identical members (sqrt'(0) is infinite).
    cost = (flat[pair_i] - flat[pair_j]).square().mean(dim=1).clamp_min(1e-24).sqrt().sum()
    centre, _ = _reduce(aligned, reduction, median)
    # Pulls the fused map towards [0,1]; without it every scale could shrink to 0 for a zero error.
    return cost + regularizer * (centre.min().abs() + (1 - centre.max()).abs())


def _float32_cost(
    params: np.ndarray, small: Tensor, reduction: DepthReduction, median: MedianRule, regularizer: float,
    shift_invariant: bool,
) -> float:  # fmt: skip
    """diffusers' evaluation of the objective: float32 tensors, per-pair RMSEs summed as Python floats in pair order."""
    aligned = _apply(small, params, shift_invariant)
    cost = 0.0
    for i, j in combinations(range(small.shape[0]), 2):
        cost += (aligned[i] - aligned[j]).square().mean().sqrt().item()
    if regularizer > 0:
        centre, _ = _reduce(aligned, reduction, median)
        cost += (centre.min().abs().item() + (1.0 - centre.max()).abs().item()) * regularizer
    return cost


def fit_member_alignment(
    members: Tensor,
    reduction: DepthReduction = "median",
    solver: Solver = "float32_finite_difference",
    median: MedianRule = "lower",
    max_iter: int = 2,
    tol: float = 1e-3,
    max_res: int | None = 1024,
    regularizer: float = 0.02,
    shift_invariant: bool = True,
) -> np.ndarray:
    """BFGS-fitted per-member [scales, shifts] (float64; scales only without shift invariance) for [K,1,H,W]."""
    with torch.inference_mode(False):  # validation/test run under inference mode; the exact solver needs autograd
        small = _downsample(members.float(), max_res)
        small = small.double().clone() if solver == "float64_autograd" else small.clone()
    init = _initial_params(small, shift_invariant)
    options = {"maxiter": max_iter, "disp": False}
    if solver == "float32_finite_difference":
        # scipy's default 2-point differences with a ~1.5e-8 step mostly vanish in float32: this barely moves
        # from the initialisation, but it is what the published ensembles used (docs/method.md §5.5).
        args = (small, reduction, median, regularizer, shift_invariant)
        return minimize(_float32_cost, init, args=args, method="BFGS", tol=tol, options=options).x
    if solver != "float64_autograd":
        raise ValueError(f"unknown solver {solver!r}; use 'float32_finite_difference' or 'float64_autograd'")

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.inference_mode(False), torch.enable_grad():
            p = torch.tensor(params, dtype=torch.float64, device=small.device, requires_grad=True)
            total = alignment_cost(small, p, reduction, median, regularizer, shift_invariant)
            (gradient,) = torch.autograd.grad(total, p)
        return float(total.detach()), gradient.cpu().numpy()

    params = minimize(objective, init, jac=True, method="BFGS", tol=tol, options=options).x
    # Shrinking all members to a constant costs at most lambda while any disagreement costs more, so long exact
    # solves can drive scales through zero; such a solution falls back to the min/max initialisation.
    if not (np.isfinite(params).all() and (params[: members.shape[0]] > 0).all()):
        return init
    return params


def ensemble_depth(
    members: Tensor,
    reduction: DepthReduction = "median",
    solver: Solver = "float32_finite_difference",
    median: MedianRule = "lower",
    max_iter: int = 2,
    tol: float = 1e-3,
    max_res: int | None = 1024,
    regularizer: float = 0.02,
    scale_invariant: bool = True,
    shift_invariant: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Align K depth maps [K,1,H,W] by per-member scale/shift and reduce them to one [1,H,W] map + uncertainty.

    Defaults are DEPTH_ENSEMBLE_PRESETS["diffusers"], which reproduces diffusers' MarigoldDepthPipeline
    .ensemble_depth; `solver="float64_autograd"` minimises the same objective with its exact gradient
    (docs/method.md §5.5). The fit runs on copies with long edge <= max_res and is applied at full resolution.
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
        params = fit_member_alignment(
            work, reduction, solver, median, max_iter, tol, max_res, regularizer, shift_invariant
        )
        work = _apply(work, params, shift_invariant)
    depth, uncertainty = _reduce(work, reduction, median)
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
