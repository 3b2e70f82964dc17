import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.alignment import _downsample_upstream_width, align_depth_lstsq, least_squares_scale_shift


def _data(seed: int = 0, shape=(3, 1, 12, 16)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    return pred, mask


def test_recovers_affine_map_with_negative_scale():
    pred, mask = _data()
    a = torch.tensor([2.0, -3.0, 0.5]).view(3, 1, 1, 1)
    b = torch.tensor([1.0, 10.0, -0.2]).view(3, 1, 1, 1)
    target = a * pred + b
    s, t = least_squares_scale_shift(pred, target, mask)
    assert s.shape == t.shape == (3,)
    assert torch.allclose(s, a.flatten(), atol=1e-4) and torch.allclose(t, b.flatten(), atol=1e-4)
    aligned = align_depth_lstsq(pred, target, mask)
    assert aligned.dtype == torch.float32
    assert torch.allclose(aligned, target, atol=1e-5)


def test_matches_torch_lstsq_and_ignores_masked_values():
    pred, mask = _data(1)
    target = 3 * pred + 1 + 0.1 * torch.randn(pred.shape, generator=torch.Generator().manual_seed(2))
    s, t = least_squares_scale_shift(pred, target, mask)
    for i in range(3):
        p, g = pred[i][mask[i]].double(), target[i][mask[i]].double()
        sol = torch.linalg.lstsq(torch.stack([p, torch.ones_like(p)], 1), g[:, None]).solution.flatten()
        assert torch.allclose(torch.stack([s[i], t[i]]).double(), sol, atol=1e-4)
    noisy_p = torch.where(mask, pred, torch.full_like(pred, float("nan")))
    noisy_g = torch.where(mask, target, torch.full_like(target, 1e30))
    s2, t2 = least_squares_scale_shift(noisy_p, noisy_g, mask)
    assert torch.allclose(s, s2, atol=1e-5) and torch.allclose(t, t2, atol=1e-5)
    aligned = align_depth_lstsq(noisy_p, noisy_g, mask)
    assert torch.allclose(aligned[mask], align_depth_lstsq(pred, target, mask)[mask], atol=1e-5)


def test_degenerate_images_fall_back_without_nan():
    pred = torch.full((3, 1, 4, 4), 0.3)
    target = torch.rand(3, 1, 4, 4) + 1
    mask = torch.ones(3, 1, 4, 4, dtype=torch.bool)
    mask[1] = False
    mask[2] = False
    mask[2, 0, 0, 0] = True
    s, t = least_squares_scale_shift(pred, target, mask)  # constant pred: det == 0 exactly
    assert torch.equal(s, torch.zeros(3)) and torch.equal(t, torch.zeros(3))
    aligned = align_depth_lstsq(pred, target, mask)
    assert torch.isfinite(aligned).all()
    assert torch.allclose(aligned[0], target[0].mean().expand(1, 4, 4))
    assert torch.equal(aligned[1], torch.zeros(1, 4, 4))
    assert aligned[2, 0, 0, 0] == target[2, 0, 0, 0]


def test_max_res_downsampled_fit_applied_at_full_res():
    pred = torch.rand(1, 1, 40, 60, generator=torch.Generator().manual_seed(4))
    target = -2 * pred + 5
    mask = torch.ones_like(pred, dtype=torch.bool)
    aligned = align_depth_lstsq(pred, target, mask, max_res=15)
    assert aligned.shape == pred.shape and torch.allclose(aligned, target, atol=1e-5)
    # with noise the low-res fit differs from the full-res one
    noisy = target + torch.randn(pred.shape, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(align_depth_lstsq(noisy, target, mask, 15), align_depth_lstsq(noisy, target, mask))
    assert torch.equal(align_depth_lstsq(noisy, target, mask, 60), align_depth_lstsq(noisy, target, mask))


def test_scale_shift_gradient_flows_and_float32_under_autocast():
    pred, mask = _data(3)
    pred = pred.to(torch.bfloat16).requires_grad_()
    target = 2 * pred.detach().float() + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = least_squares_scale_shift(pred, target, mask)
    assert s.dtype == t.dtype == torch.float32
    (s.sum() + t.sum()).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gradient_matches_textbook_normal_equations():
    pred, mask = _data(6, shape=(2, 1, 6, 7))
    target = torch.rand(pred.shape, generator=torch.Generator().manual_seed(7)) * 4
    p1 = pred.double().requires_grad_()
    m = mask.double()
    a00, a01, a11 = (m * p1**2).sum((1, 2, 3)), (m * p1).sum((1, 2, 3)), m.sum((1, 2, 3))
    b0, b1 = (m * p1 * target).sum((1, 2, 3)), (m * target).sum((1, 2, 3))
    det = a00 * a11 - a01**2
    s_ref, t_ref = (a11 * b0 - a01 * b1) / det, (a00 * b1 - a01 * b0) / det
    (s_ref.sum() + 2 * t_ref.sum()).backward()
    p2 = pred.clone().requires_grad_()
    s, t = least_squares_scale_shift(p2, target, mask)
    (s.sum() + 2 * t.sum()).backward()
    assert torch.allclose(s.double(), s_ref, atol=1e-4) and torch.allclose(t.double(), t_ref, atol=1e-4)
    assert torch.allclose(p2.grad.double(), p1.grad, atol=1e-3)


def _marigold_reference(pred, gt, mask, max_res):
    """Marigold's evaluation alignment done literally per image: [H,W] -> [1,H,W], torch.nn.Upsample, numpy lstsq."""
    out = []
    for p, g, m in zip(pred, gt, mask):
        p2, g2, m2 = p.squeeze(), g.squeeze(), m.squeeze()
        factor = np.min(max_res / np.array(p.shape[-2:]))
        if factor < 1:
            upsample = torch.nn.Upsample(scale_factor=factor, mode="nearest")  # reads [1,H,W] as (N, C, L)
            p2, g2, m2 = upsample(p2[None]), upsample(g2[None]), upsample(m2[None].float()).bool()
        x, y = p2[m2].double().numpy(), g2[m2].double().numpy()
        (s, t), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
        out.append(p.double() * s + t)
    return torch.stack(out)


@pytest.mark.parametrize("shape, max_res", [((2, 1, 40, 60), 16), ((1, 1, 50, 30), 20), ((1, 1, 63, 95), 32)])
def test_default_downsampling_reproduces_marigold_evaluation(shape, max_res):
    g = torch.Generator().manual_seed(8)
    gt = torch.rand(shape, generator=g) * 10 + 0.5
    pred = 0.3 * gt + 0.5 + torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    reference = _marigold_reference(pred, gt, mask, max_res)
    aligned = align_depth_lstsq(pred, gt, mask, max_res)
    torch.testing.assert_close(aligned.double(), reference, rtol=1e-6, atol=1e-6)
    isotropic = align_depth_lstsq(pred, gt, mask, max_res, downsample="isotropic")
    assert (isotropic - aligned).abs().max() > 1e-3  # the two rules fit different pixels


def test_upstream_width_keeps_every_row_and_takes_column_floor_j_over_s():
    x = torch.arange(8 * 12, dtype=torch.float32).view(1, 1, 8, 12)
    small = _downsample_upstream_width(x, 6)  # s = min(6/8, 6/12) = 0.5
    assert small.shape == (1, 1, 8, 6)
    torch.testing.assert_close(small, x[..., [0, 2, 4, 6, 8, 10]], rtol=0, atol=0)


def test_isotropic_option_fits_on_the_longest_side_resized_copies():
    g = torch.Generator().manual_seed(9)
    gt = torch.rand(2, 1, 40, 60, generator=g) * 10 + 0.5
    pred = 0.3 * gt + 0.5 + torch.randn(gt.shape, generator=g)
    mask = torch.rand(gt.shape, generator=g) > 0.3
    aligned = align_depth_lstsq(pred, gt, mask, 15, downsample="isotropic")
    down = [F.interpolate(x.float(), size=(10, 15), mode="nearest") for x in (pred, gt, mask)]
    for i in range(2):
        p, y = down[0][i][down[2][i].bool()].double(), down[1][i][down[2][i].bool()].double()
        sol = torch.linalg.lstsq(torch.stack([p, torch.ones_like(p)], 1), y[:, None]).solution.flatten()
        torch.testing.assert_close(aligned[i].double(), pred[i].double() * sol[0] + sol[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="upstream_width"):
        align_depth_lstsq(pred, gt, mask, 15, downsample="bilinear")
