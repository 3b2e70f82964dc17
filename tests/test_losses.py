import math

import torch

from lightning_modules.losses import affine_invariant_l1, angular_loss


def _depth(seed: int = 0, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) > 0.25


def test_affine_l1_zero_for_affine_targets():
    pred, mask = _depth()
    assert affine_invariant_l1(pred, pred, mask).item() < 1e-6
    a = torch.tensor([-4.0, 7.5]).view(2, 1, 1, 1)
    b = torch.tensor([20.0, 3.0]).view(2, 1, 1, 1)
    assert affine_invariant_l1(pred, a * pred + b, mask).item() < 1e-5


def test_affine_l1_masked_pixels_have_no_influence():
    pred, mask = _depth(1)
    target = 5 + 3 * pred + torch.rand(pred.shape)
    ref = affine_invariant_l1(pred, target, mask)
    wild_pred = torch.where(mask, pred, torch.full_like(pred, float("nan")))
    wild_target = torch.where(mask, target, torch.full_like(target, 1e6))
    wild_pred.requires_grad_()
    out = affine_invariant_l1(wild_pred, wild_target, mask)
    assert torch.allclose(out, ref)
    out.backward()
    assert torch.isfinite(wild_pred.grad).all() and (wild_pred.grad[~mask] == 0).all()


def test_affine_l1_pooled_mean_over_pixels():
    # image 0: 2 valid pixels at the same prediction -> det 0 -> s = t = 0, residuals |d*| = 1 and 3
    # image 1: 4 valid pixels fitted exactly -> residuals 0
    pred = torch.zeros(2, 1, 2, 2)
    pred[1] = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    target = torch.ones(2, 1, 2, 2)
    target[0, 0, 0, 1] = 3.0
    target[1] = 2 * pred[1] + 1
    mask = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = False
    loss = affine_invariant_l1(pred, target, mask)
    assert math.isclose(loss.item(), (1 + 3) / 6, rel_tol=1e-6)  # per-image means would give (2 + 0) / 2 = 1


def test_affine_l1_constant_prediction_finite():
    pred = torch.full((2, 1, 8, 8), 0.37, requires_grad=True)
    target = torch.rand(2, 1, 8, 8) * 10
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    loss = affine_invariant_l1(pred, target, mask)
    assert torch.isclose(loss, target.abs().mean())  # s = t = 0 fallback
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_affine_l1_empty_mask_zero_with_grad():
    pred = torch.full((2, 1, 4, 4), float("nan")).requires_grad_()
    loss = affine_invariant_l1(pred, torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_affine_l1_gradient_reaches_pred_and_float32_under_autocast():
    pred, mask = _depth(2)
    pred = pred.to(torch.bfloat16).requires_grad_()
    target = torch.rand(pred.shape) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = affine_invariant_l1(pred, target, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def _normals(v, shape=(1, 3, 2, 2)):
    return torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).expand(shape).clone()


def test_angular_values():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    z, x = _normals([0, 0, 1]), _normals([1, 0, 0])
    assert angular_loss(z, z, mask).item() < 2e-3
    assert math.isclose(angular_loss(x, z, mask).item(), math.pi / 2, rel_tol=1e-6)
    assert math.isclose(angular_loss(-z, z, mask).item(), math.pi, rel_tol=1e-3)
    assert math.isclose(angular_loss(3 * x, z, mask).item(), math.pi / 2, rel_tol=1e-6)  # normalised inside


def test_angular_gradient_finite_at_parallel_and_antiparallel():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    target = _normals([0.0, 0.6, 0.8])
    for sign in (1, -1):
        pred = (sign * target).requires_grad_()
        angular_loss(pred, target, mask).backward()
        assert torch.isfinite(pred.grad).all()


def test_angular_mask_and_empty_mask():
    pred = torch.randn(2, 3, 4, 4)
    target = torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 1, 4, 4) > 0.5
    ref = angular_loss(pred, target, mask)
    wild = torch.where(mask, pred, torch.full_like(pred, float("inf"))).requires_grad_()
    out = angular_loss(wild, target, mask)
    assert torch.allclose(out, ref)
    out.backward()
    assert torch.isfinite(wild.grad).all()
    p = pred.clone().requires_grad_()
    empty = angular_loss(p, target, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.grad_fn is not None
    empty.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert angular_loss(pred.bfloat16(), target.bfloat16(), mask).dtype == torch.float32
