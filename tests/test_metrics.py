import math

import numpy as np
import pytest
import torch

from lightning_modules.alignment import align_depth_lstsq
from lightning_modules.metrics import DEPTH_METRICS, NORMAL_METRICS, DepthMetrics, NormalMetrics

MIN_D, MAX_D = 1e-3, 10.0


def _numpy_depth_reference(pred, gt, mask, alignment=True):
    """Straightforward per-image loop: np.linalg.lstsq, clip, metrics, mean over images."""
    rows = []
    for p, g, m in zip(pred.numpy().astype(np.float64), gt.numpy().astype(np.float64), mask.numpy()):
        m = m & (g > MIN_D) & (g < MAX_D)
        if not m.any():
            continue
        p, g = p[m], g[m]
        if alignment:
            (s, t), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)
            p = s * p + t
        p = np.clip(np.clip(p, MIN_D, MAX_D), 1e-6, None)
        e = np.log(p) - np.log(g)
        ratio = np.maximum(p / g, g / p)
        rows.append(
            [
                np.mean(np.abs(p - g) / g),
                np.mean((p - g) ** 2 / g),
                np.sqrt(np.mean((p - g) ** 2)),
                np.sqrt(np.mean(e**2)),
                np.mean(np.abs(np.log10(p) - np.log10(g))),
                *(np.mean(ratio < 1.25**k) for k in (1, 2, 3)),
                np.sqrt(np.mean((1 / p - 1 / g) ** 2)),
                100 * np.sqrt(np.mean(e**2) - np.mean(e) ** 2),
            ]
        )
    return dict(zip(DEPTH_METRICS, np.mean(rows, 0)))


def _depth_batch(seed=0, b=4, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 1, h, w, generator=g) * 12  # some gt beyond MAX_D must be excluded
    pred = 0.3 * gt + 0.5 + 0.4 * torch.randn(b, 1, h, w, generator=g)
    mask = torch.rand(b, 1, h, w, generator=g) > 0.2
    return pred, gt, mask


@pytest.mark.parametrize("alignment", ["least_squares", "none"])
def test_depth_matches_numpy_reference(alignment):
    pred, gt, mask = _depth_batch()
    if alignment == "none":
        pred = pred.abs() * 3
    metric = DepthMetrics(MIN_D, MAX_D, alignment=alignment)
    metric.update(pred, gt, mask)
    out = metric.compute()
    ref = _numpy_depth_reference(pred, gt, mask, alignment == "least_squares")
    assert set(out) == set(DEPTH_METRICS)
    for name in DEPTH_METRICS:
        assert out[name].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name
    assert 0 < out["delta1"] < 1


def test_depth_affine_prediction_is_perfect_and_masked_pixels_ignored():
    _, gt, mask = _depth_batch(1)
    gt = gt.clamp(0.5, 9.5)
    pred = (gt - 4.0) / -2.5  # negative scale
    wild = torch.where(mask, pred, torch.full_like(pred, float("nan")))
    metric = DepthMetrics(MIN_D, MAX_D)
    metric.update(wild, torch.where(mask, gt, torch.full_like(gt, -1e9)), mask)
    out = metric.compute()
    assert out["abs_rel"] < 1e-5 and out["rmse"] < 1e-4
    assert out["delta1"] == 1.0 and out["delta3"] == 1.0
    assert all(torch.isfinite(v) for v in out.values())


def test_depth_empty_images_skipped_and_counted():
    pred, gt, mask = _depth_batch(2, b=3)
    mask[1] = False
    metric = DepthMetrics(MIN_D, MAX_D)
    metric.update(pred, gt, mask)
    ref = DepthMetrics(MIN_D, MAX_D)
    ref.update(pred[[0, 2]], gt[[0, 2]], mask[[0, 2]])
    assert metric.count == 2 and metric.skipped == 1
    for name, value in metric.compute().items():
        assert torch.allclose(value, ref.compute()[name])


def test_depth_state_merge_equals_single_pass():
    pred, gt, mask = _depth_batch(3, b=6)
    full = DepthMetrics(MIN_D, MAX_D)
    full.update(pred, gt, mask)
    a, b = DepthMetrics(MIN_D, MAX_D), DepthMetrics(MIN_D, MAX_D)
    a.update(pred[:2], gt[:2], mask[:2])
    b.update(pred[2:], gt[2:], mask[2:])
    a.merge_state(b)
    for name, value in full.compute().items():
        assert torch.allclose(value, a.compute()[name], rtol=1e-6)


def test_depth_align_max_res_and_bf16_autocast():
    pred, gt, mask = _depth_batch(4, b=2, h=40, w=60)
    low = DepthMetrics(MIN_D, MAX_D, align_max_res=20)
    low.update(pred, gt, mask)
    full = DepthMetrics(MIN_D, MAX_D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full.update(pred.bfloat16(), gt, mask)
    out_low, out_full = low.compute(), full.compute()
    assert out_full["abs_rel"].dtype == torch.float32
    assert out_low["abs_rel"] != out_full["abs_rel"]
    assert out_low["abs_rel"] == pytest.approx(out_full["abs_rel"].item(), rel=0.2)


def test_depth_invalid_arguments_and_empty_compute():
    with pytest.raises(ValueError):
        DepthMetrics(1.0, 0.5)
    with pytest.raises(ValueError):
        DepthMetrics(0.0, 1.0, alignment="median")
    metric = DepthMetrics(MIN_D, MAX_D)
    metric.update(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    assert all(torch.isnan(v) for v in metric.compute().values())


def _pixels(vectors):
    """[[x,y,z], ...] -> [1,3,1,N] normals."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)


def test_normals_basic_angles_and_thresholds():
    target = _pixels([[0, 0, 1]] * 4)
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    pred = _pixels([[0, 0, 1], [1, 0, 0], [0, 0, -1], [s, 0, c]])
    metric = NormalMetrics()
    metric.update(pred, target, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    out = metric.compute()
    assert set(out) == set(NORMAL_METRICS)
    assert out["mean"].item() == pytest.approx((0 + 90 + 180 + 10) / 4, abs=1e-3)
    assert out["rmse"].item() == pytest.approx(math.sqrt((90**2 + 180**2 + 10**2) / 4), abs=1e-3)
    assert out["median"].item() == pytest.approx(10, abs=0.006)  # lower median of {0, 10, 90, 180}
    assert [out[k].item() for k in ("a5", "a7_5", "a11_25", "a22_5", "a30")] == pytest.approx([25, 25, 50, 50, 50])


def test_normals_pooled_not_per_image():
    target = _pixels([[0, 0, 1]] * 3).expand(2, 3, 1, 3).clone()
    pred = target.clone()
    pred[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # image A: its only valid pixel is 90 degrees off
    mask = torch.ones(2, 1, 1, 3, dtype=torch.bool)
    mask[0, 0, 0, 1:] = False
    metric = NormalMetrics()
    metric.update(pred, target, mask)
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(22.5, abs=1e-4)  # per-image averaging would give 45
    assert out["a11_25"].item() == pytest.approx(75.0)
    assert metric.count == 4


def test_normals_vs_numpy_reference_merge_and_autocast():
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(3, 3, 10, 12, generator=g), dim=1)
    pred = target + 0.4 * torch.randn(3, 3, 10, 12, generator=g)
    mask = torch.rand(3, 1, 10, 12, generator=g) > 0.3
    a, b, full = NormalMetrics(), NormalMetrics(), NormalMetrics()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full.update(pred, target, mask)
    a.update(pred[:1], target[:1], mask[:1])
    b.update(pred[1:], target[1:], mask[1:])
    a.merge_state(b)
    p, t = pred.double().numpy(), target.double().numpy()
    cos = (p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))
    e = np.degrees(np.arccos(np.clip(cos, -1, 1)))[mask[:, 0].numpy()]
    ref = [e.mean(), np.sort(e)[(e.size + 1) // 2 - 1], np.sqrt((e**2).mean())]
    ref += [100 * (e < th).mean() for th in (5, 7.5, 11.25, 22.5, 30)]
    for out in (full.compute(), a.compute()):
        assert out["mean"].dtype == torch.float32
        got = [out[k].item() for k in NORMAL_METRICS]
        assert got[:3] == pytest.approx(ref[:3], abs=6e-3)
        assert got[3:] == pytest.approx(ref[3:], abs=1e-4)  # exact counts, float32 output


@pytest.mark.parametrize("downsample", ["upstream_width", "isotropic"])
def test_depth_align_downsample_is_threaded_to_the_fit(downsample):
    pred, gt, mask = _depth_batch(5, b=2, h=40, w=60)
    metric = DepthMetrics(MIN_D, MAX_D, align_max_res=20, align_downsample=downsample)
    metric.update(pred, gt, mask)
    valid = mask & (gt > MIN_D) & (gt < MAX_D)
    prealigned = DepthMetrics(MIN_D, MAX_D, alignment="none")
    prealigned.update(align_depth_lstsq(pred, gt, valid, 20, downsample), gt, mask)
    assert metric.compute() == prealigned.compute()
    assert DepthMetrics(MIN_D, MAX_D, align_max_res=20).align_downsample == "upstream_width"
    with pytest.raises(ValueError, match="align_downsample"):
        DepthMetrics(MIN_D, MAX_D, align_downsample="bicubic")
