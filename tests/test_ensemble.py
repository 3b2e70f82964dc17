"""Depth and normal ensembling (docs/method.md §5.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ensemble import ensemble_depth, ensemble_normals

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


@pytest.mark.parametrize("shift_invariant", [True, False])
def test_long_solves_do_not_collapse(shift_invariant: bool) -> None:
    # The objective's global optimum shrinks every member to a constant; a long solve must not return it.
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1, 1, 40, 50, generator=g) * 0.8 + 0.2
    members = torch.cat([d * s * (1 + 0.05 * torch.randn(d.shape, generator=g)) for s in (1, 2, 0.3, 5, 1.5)])
    fused, uncertainty = ensemble_depth(members, max_iter=50, tol=1e-9, shift_invariant=shift_invariant)
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
