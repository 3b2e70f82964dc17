"""Per-sample targets (docs/method.md §4.3) and the horizontal flip (§4.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import targets
from datamodules.targets import build_targets, hflip


def sample(depth: np.ndarray, mask: np.ndarray, **extra) -> dict:
    h, w = depth.shape
    return {"key": "k", "rgb": np.full((h, w, 3), 255, np.uint8), "depth": depth, "mask": mask, "meta": {}, **extra}


def test_targets_on_a_hand_built_case():
    depth = np.linspace(1.0, 10.0, 64, dtype=np.float32).reshape(8, 8)
    mask = np.ones((8, 8), bool)
    mask[0, :2] = False
    out = build_targets(sample(depth, mask))
    valid = torch.from_numpy(depth[mask])
    q2, q98 = torch.quantile(valid, 0.02).item(), torch.quantile(valid, 0.98).item()
    assert out["rgb"].dtype == torch.float32 and out["rgb"].shape == (3, 8, 8) and out["rgb"].min() == 1.0
    assert out["mask"].dtype == torch.bool and out["mask"].shape == (1, 8, 8) and out["mask"].sum() == 62
    assert out["depth"][0, 0, 0] == 0 and out["depth"][0, 7, 7] == pytest.approx(10.0)  # raw, for metrics
    assert out["depth_target"][0, 0, 0] == pytest.approx(q98)  # invalid -> far
    assert out["depth_target"][0, 7, 7] == pytest.approx(q98)  # outlier clamped, still valid
    assert out["depth_target"].min() == pytest.approx(q2) and out["mask"][0, 7, 7]
    expected = ((2 * (out["depth_target"] - q2) / (q98 - q2)) - 1).clamp(-1, 1)
    torch.testing.assert_close(out["depth_norm"], expected)
    assert out["depth_norm"].min() == -1.0 and out["depth_norm"].max() == 1.0
    assert not out["normals"].any()  # no normals in the sample


def test_range_and_normals_follow_the_mask():
    depth = np.linspace(0.5, 90.0, 64, dtype=np.float32).reshape(8, 8)
    normals = np.zeros((8, 8, 3), np.float32)
    normals[..., 2] = 1
    out = build_targets({**sample(depth, np.ones((8, 8), bool), normals=normals), "meta": {"max_depth": 50.0}})
    kept = (depth > 1e-5) & (depth < 50.0)  # the sample's own max_depth is tighter than the default 80 m
    assert torch.equal(out["mask"][0], torch.from_numpy(kept))
    assert torch.equal(out["normals"][2] == 1, torch.from_numpy(kept)) and not out["normals"][:2].any()
    assert (out["depth"][0][~torch.from_numpy(kept)] == 0).all()


def test_constant_or_empty_depth_empties_the_mask_without_nan():
    for depth, mask in [
        (np.full((8, 8), 3.0, np.float32), np.ones((8, 8), bool)),
        (np.zeros((8, 8), np.float32), np.zeros((8, 8), bool)),
    ]:
        out = build_targets(sample(depth, mask, normals=np.ones((8, 8, 3), np.float32)))
        assert not out["mask"].any()
        for key in ("depth", "depth_target", "depth_norm", "normals"):
            assert torch.isfinite(out[key]).all() and not out[key].any(), key


def test_nan_depth_is_invalid():
    depth = np.linspace(1.0, 2.0, 64, dtype=np.float32).reshape(8, 8)
    depth[3, 3] = np.nan
    out = build_targets(sample(depth, np.ones((8, 8), bool)))
    assert not out["mask"][0, 3, 3] and out["depth"][0, 3, 3] == 0
    assert all(torch.isfinite(out[k]).all() for k in ("depth", "depth_target", "depth_norm"))


def test_quantiles_equal_torch_quantile_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    for n in [1, 2, 3, 49, 50, 51, 297, 1001, 307_200]:
        values = torch.rand(n, generator=generator) * 10
        expected = torch.quantile(values, torch.tensor([0.02, 0.98]))
        assert torch.equal(torch.stack(targets._quantiles(values, 0.02, 0.98)), expected), n


def test_quantiles_of_inputs_torch_quantile_refuses():
    values = torch.arange(16_777_217, dtype=torch.float32).flip(0)  # over torch.quantile's 16 M limit
    low, high = targets._quantiles(values, 0.02, 0.98)
    n = values.numel() - 1
    assert low == pytest.approx(0.02 * n, abs=1) and high == pytest.approx(0.98 * n, abs=1)


def test_odd_sizes_are_a_clear_error():
    with pytest.raises(ValueError, match="k: image size 10x8 is not a multiple of 8"):
        build_targets(sample(np.ones((10, 8), np.float32), np.ones((10, 8), bool)))


def test_hflip_mirrors_rasters_and_negates_normal_x():
    depth = np.linspace(1.0, 2.0, 64, dtype=np.float32).reshape(8, 8)
    normals = np.random.default_rng(0).normal(size=(8, 8, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    mask = np.ones((8, 8), bool)
    mask[:, 0] = False
    out = build_targets(sample(depth, mask, normals=normals))
    flipped = hflip(out)
    for key in ("rgb", "depth", "depth_target", "depth_norm", "mask"):
        assert torch.equal(flipped[key], out[key].flip(-1)), key
    assert torch.equal(flipped["normals"][0], -out["normals"][0].flip(-1))
    assert torch.equal(flipped["normals"][1:], out["normals"][1:].flip(-1))
    assert flipped["mask"].dtype == torch.bool and not flipped["mask"][..., -1].any()
