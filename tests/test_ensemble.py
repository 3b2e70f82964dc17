"""Depth and normal ensembling (docs/method.md §5.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import MarigoldDepthPipeline

from lightning_modules.alignment import align_depth_lstsq
from lightning_modules.ensemble import (
    DEPTH_ENSEMBLE_PRESETS,
    _initial_params,
    alignment_cost,
    ensemble_depth,
    ensemble_normals,
    fit_member_alignment,
)

AFFINE = [(1.0, 0.0), (2.0, 0.5), (0.3, 1.0), (5.0, -2.0)]


@pytest.fixture
def depth() -> torch.Tensor:
    """A known depth map in [0,1] with min 0 and max 1, [1,1,H,W]."""
    d = torch.rand(1, 1, 24, 32, generator=torch.Generator().manual_seed(0))
    return (d - d.min()) / (d.max() - d.min())


@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_affine_copies_recover_the_depth(depth: torch.Tensor, reduction: str) -> None:
    members = torch.cat([depth * s + t for s, t in AFFINE])
    fused, uncertainty = ensemble_depth(members, reduction=reduction)
    assert fused.shape == uncertainty.shape == (1, 24, 32)
    torch.testing.assert_close(fused, depth[0], atol=1e-3, rtol=0)
    assert uncertainty.abs().max() < 1e-3


def test_solver_on_downsampled_copies_applies_at_full_resolution(depth: torch.Tensor) -> None:
    members = torch.cat([depth * s + t for s, t in AFFINE])
    fused, _ = ensemble_depth(members, max_res=8, max_iter=5)
    torch.testing.assert_close(fused, depth[0], atol=1e-3, rtol=0)


def test_median_is_robust_to_one_outlier(depth: torch.Tensor) -> None:
    outlier = torch.rand(1, 1, 24, 32, generator=torch.Generator().manual_seed(1))
    members = torch.cat([depth * s + t for s, t in AFFINE] + [outlier])
    median, _ = ensemble_depth(members, reduction="median")
    mean, _ = ensemble_depth(members, reduction="mean")
    assert (median - depth[0]).abs().mean() < 1e-3
    assert (mean - depth[0]).abs().mean() > 0.02


def test_noisy_members_agree_with_the_truth(depth: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(2)
    members = torch.cat([depth * s + t + 0.01 * s * torch.randn(depth.shape, generator=g) for s, t in AFFINE])
    fused, uncertainty = ensemble_depth(members)
    assert fused.min() == 0 and fused.max() == 1
    assert (fused - depth[0]).abs().mean() < 0.02
    assert 0 < uncertainty.mean() < 0.02


def test_single_member_is_returned_unchanged(depth: torch.Tensor) -> None:
    fused, uncertainty = ensemble_depth(depth * 3 + 1)
    assert torch.equal(fused, (depth * 3 + 1)[0]) and uncertainty is None


def test_identical_members_have_zero_uncertainty(depth: torch.Tensor) -> None:
    for reduction in ("median", "mean"):
        fused, uncertainty = ensemble_depth(depth.repeat(3, 1, 1, 1), reduction=reduction)
        assert torch.count_nonzero(uncertainty) == 0
        torch.testing.assert_close(fused, depth[0])


def test_scale_only_pins_minimum_at_zero() -> None:
    d = torch.linspace(0.2, 1.0, 40).view(1, 1, 5, 8)
    members = torch.cat([d * s for s in (1.0, 3.0, 0.5)])
    fused, _ = ensemble_depth(members, shift_invariant=False)
    torch.testing.assert_close(fused, d[0], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="shift-only"):
        ensemble_depth(members, scale_invariant=False, shift_invariant=True)


def unit_normals(seed: int) -> torch.Tensor:
    n = torch.randn(1, 3, 6, 7, generator=torch.Generator().manual_seed(seed))
    n[:, 2] = n[:, 2].abs() + 0.5
    return F.normalize(n, dim=1)


@pytest.mark.parametrize("reduction", ["closest", "mean"])
def test_identical_normals(reduction: str) -> None:
    n = unit_normals(0)
    fused, uncertainty = ensemble_normals(n.repeat(4, 1, 1, 1), reduction=reduction)
    torch.testing.assert_close(fused, n[0])
    assert fused.shape == (3, 6, 7) and uncertainty.shape == (1, 6, 7)
    assert uncertainty.abs().max() < 1e-6


def test_two_symmetric_normals() -> None:
    angle = torch.tensor(0.3)
    a = torch.stack([angle.sin(), torch.tensor(0.0), angle.cos()]).view(1, 3, 1, 1).expand(1, 3, 4, 5)
    b = a * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    mean, uncertainty = ensemble_normals(torch.cat([a, b]), reduction="mean")
    torch.testing.assert_close(mean, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 5))
    torch.testing.assert_close(uncertainty, torch.full((1, 4, 5), 0.3 / torch.pi))
    closest, _ = ensemble_normals(torch.cat([a, b]), reduction="closest")
    assert torch.allclose(closest, a[0]) or torch.allclose(closest, b[0])


def test_closest_picks_the_member_nearest_the_mean_per_pixel() -> None:
    up = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2).clone()
    tilted = F.normalize(up + torch.tensor([0.2, 0.0, 0.0]).view(1, 3, 1, 1), dim=1)
    far = F.normalize(up + torch.tensor([1.5, 0.0, 0.0]).view(1, 3, 1, 1), dim=1)
    # Pixel 0: members (up, up, far) -> up is closest; pixel 1: (tilted, far, far) -> far is closest.
    first = torch.cat([up[..., :1], tilted[..., 1:]], dim=-1)
    second = torch.cat([up[..., :1], far[..., 1:]], dim=-1)
    third = far
    fused, _ = ensemble_normals(torch.cat([first, second, third]), reduction="closest")
    torch.testing.assert_close(fused[:, 0, 0], up[0, :, 0, 0])
    torch.testing.assert_close(fused[:, 0, 1], far[0, :, 0, 1])


@pytest.mark.parametrize("solver", ["float32_finite_difference", "float64_autograd"])
@pytest.mark.parametrize("shift_invariant", [True, False])
def test_long_solves_do_not_collapse(shift_invariant: bool, solver: str) -> None:
    # The objective's global optimum shrinks every member to a constant; a long solve must not return it.
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1, 1, 40, 50, generator=g) * 0.8 + 0.2
    members = torch.cat([d * s * (1 + 0.05 * torch.randn(d.shape, generator=g)) for s in (1, 2, 0.3, 5, 1.5)])
    fused, uncertainty = ensemble_depth(members, solver=solver, max_iter=50, tol=1e-9, shift_invariant=shift_invariant)
    assert fused.max() == 1 and fused.min() >= 0 and torch.isfinite(uncertainty).all()
    target = (d[0] - d.min()) / (d.max() - d.min()) if shift_invariant else d[0] / d.max()
    assert (fused - target).abs().mean() < 0.06


def test_depth_ensemble_runs_under_inference_mode():
    """Validation and test loops run under torch.inference_mode; the solver's autograd gradient must still work."""
    torch.manual_seed(0)
    base = torch.rand(1, 1, 16, 16)
    members = torch.cat([base * (1 + 0.1 * k) + 0.05 * k for k in range(4)])
    expected, _ = ensemble_depth(members)
    with torch.inference_mode():
        fused, _ = ensemble_depth(members)
    torch.testing.assert_close(fused, expected)


def affine_members(seed: int, k: int, height: int = 30, width: int = 44) -> torch.Tensor:
    """K noisy affine copies of one random map, [K,1,H,W]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(1, 1, height, width, generator=g)
    scale, shift = torch.rand(k, 1, 1, 1, generator=g) * 2 + 0.2, torch.rand(k, 1, 1, 1, generator=g) - 0.5
    return d * scale + shift + 0.05 * torch.randn(k, 1, height, width, generator=g)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 10])
@pytest.mark.parametrize("shift_invariant", [True, False])
@pytest.mark.parametrize("reduction, max_res", [("median", 1024), ("median", 16), ("mean", 20)])
def test_diffusers_preset_reproduces_diffusers(k: int, shift_invariant: bool, reduction: str, max_res: int) -> None:
    members = affine_members(k + 10 * shift_invariant, k)
    expected, expected_uncertainty = MarigoldDepthPipeline.ensemble_depth(
        members, True, shift_invariant, True, reduction=reduction, max_res=max_res
    )
    options = {**DEPTH_ENSEMBLE_PRESETS["diffusers"], "max_res": max_res}
    fused, uncertainty = ensemble_depth(members, **{"reduction": reduction, **options}, shift_invariant=shift_invariant)
    torch.testing.assert_close(fused, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncertainty, expected_uncertainty[0], rtol=0, atol=1e-6)
    assert ensemble_depth(members, reduction, max_res=max_res, shift_invariant=shift_invariant)[0].equal(fused)


# Outputs of the float64 exact-gradient solver before the diffusers preset existed (midpoint median, max_res 16).
PREVIOUS_SOLVER = [
    (0, 4, True, "median", 384.40916673187166, 29.84026950300904),
    (1, 5, False, "median", 280.3649031412788, 141.95239029149525),
    (2, 3, True, "mean", 372.2071823980659, 23.39344288315624),
]


@pytest.mark.parametrize("seed, k, shift_invariant, reduction, fused_sum, uncertainty_sum", PREVIOUS_SOLVER)
def test_exact_gradient_preset_reproduces_the_previous_solver(
    seed: int, k: int, shift_invariant: bool, reduction: str, fused_sum: float, uncertainty_sum: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(1, 1, 24, 32, generator=g)
    scale, shift = torch.rand(k, 1, 1, 1, generator=g) * 2 + 0.2, torch.rand(k, 1, 1, 1, generator=g) - 0.5
    members = d * scale + shift + 0.05 * torch.randn(k, 1, 24, 32, generator=g)
    options = {**DEPTH_ENSEMBLE_PRESETS["exact_gradient"], "max_res": 16}
    fused, uncertainty = ensemble_depth(members, **{"reduction": reduction, **options}, shift_invariant=shift_invariant)
    assert fused.double().sum().item() == pytest.approx(fused_sum, rel=1e-6)
    assert uncertainty.double().sum().item() == pytest.approx(uncertainty_sum, rel=1e-6)


def test_median_rules_differ_only_for_even_member_counts() -> None:
    values = torch.tensor([0.0, 1.0, 3.0, 10.0]).view(4, 1, 1, 1)
    options = dict(scale_invariant=False, shift_invariant=False)  # no alignment: the reduction alone
    assert ensemble_depth(values, median="lower", **options)[0].item() == 1.0  # torch.median
    assert ensemble_depth(values, median="midpoint", **options)[0].item() == 2.0
    odd = [ensemble_depth(values[:3], median=rule, **options)[0] for rule in ("lower", "midpoint")]
    assert odd[0] == odd[1] == 1.0


@pytest.mark.parametrize("name", sorted(DEPTH_ENSEMBLE_PRESETS))
@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_presets_take_the_callers_reduction(name: str, reduction: str, depth: torch.Tensor) -> None:
    assert "reduction" not in DEPTH_ENSEMBLE_PRESETS[name]
    members = torch.cat([depth * s + t for s, t in AFFINE])
    fused, _ = ensemble_depth(members, **{"reduction": reduction, **DEPTH_ENSEMBLE_PRESETS[name]})
    torch.testing.assert_close(fused, depth[0], atol=1e-3, rtol=0)


def realistic_members(seed: int, k: int = 10, height: int = 48, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """K min-max normalised members of a smooth scene with correlated and pixel noise, and the scene (depth 1..2)."""
    g = torch.Generator().manual_seed(seed)
    scene = F.interpolate(torch.rand(1, 1, 6, 8, generator=g), size=(height, width), mode="bicubic")
    scene = (scene - scene.min()) / (scene.max() - scene.min())
    noise = F.interpolate(torch.randn(k, 1, 12, 16, generator=g), size=(height, width), mode="bilinear")
    members = scene + 0.03 * (noise + 0.5 * torch.randn(k, 1, height, width, generator=g))
    low, high = members.amin((1, 2, 3), keepdim=True), members.amax((1, 2, 3), keepdim=True)
    return (members - low) / (high - low), scene[0] + 1


def test_exact_gradient_reaches_a_lower_cost_than_diffusers() -> None:
    """Measures docs/method.md §5.5 (run with -s to print the table)."""
    print("\nseed  cost: init  diffusers  exact | fused |diff|: mean  max | AbsRel vs scene: diffusers  exact")
    for seed in range(3):
        members, scene = realistic_members(seed)
        init = _initial_params(members, True)
        fits = [fit_member_alignment(members, **DEPTH_ENSEMBLE_PRESETS[n]) for n in ("diffusers", "exact_gradient")]
        cost = [alignment_cost(members, p).item() for p in (init, *fits)]  # one float64 cost, lower median
        fused = [ensemble_depth(members, **DEPTH_ENSEMBLE_PRESETS[n])[0] for n in ("diffusers", "exact_gradient")]
        mask = torch.ones_like(scene, dtype=torch.bool)
        abs_rel = [((align_depth_lstsq(f[None], scene[None], mask[None])[0] - scene).abs() / scene).mean().item()
                   for f in fused]  # fmt: skip
        diff = (fused[0] - fused[1]).abs()
        print(f"{seed}  {cost[0]:.4f}  {cost[1]:.4f}  {cost[2]:.4f} | {diff.mean():.2e}  {diff.max():.2e} | "
              f"{abs_rel[0]:.5f}  {abs_rel[1]:.5f}")  # fmt: skip
        assert cost[2] < cost[1] < cost[0]
