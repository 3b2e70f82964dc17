"""Task conversions, losses and previews for depth and normals."""

import torch

from lightning_modules.evaluation import EvalSpec
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import DiffusionObjective, E2EObjective
from lightning_modules.tasks import DepthTask, NormalsTask
from lightning_modules.tiny import TinySpec
from tests.helpers import fake_batch


def normals_batch() -> dict:
    batch = fake_batch()
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 32, 48), dim=1)
    batch["normals"] = normals * batch["mask"]
    return batch


def test_normals_from_decoded_are_unit_vectors():
    decoded = torch.randn(2, 3, 8, 8) * 3
    normals = NormalsTask().from_decoded(decoded)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 8, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(normals, torch.nn.functional.normalize(decoded, dim=1), atol=1e-4, rtol=0)


def test_depth_from_decoded_is_clamped_channel_mean():
    decoded = torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    assert DepthTask().from_decoded(decoded).item() == 1.0


def test_normals_loss_has_finite_gradient_at_perfect_prediction():
    batch = normals_batch()
    prediction = batch["normals"].clone().requires_grad_()
    loss = NormalsTask().loss(prediction, batch)
    loss.backward()
    assert loss < 2e-3 and torch.isfinite(prediction.grad).all()


def test_both_objectives_train_normals_with_finite_gradients():
    model = GeometryEstimator(tiny=TinySpec(seed=0), task="normals")
    for objective in (E2EObjective(), DiffusionObjective()):
        model.zero_grad()
        loss, _ = objective.training_loss(model.core, model.task, normals_batch())
        loss.backward()
        grads = [p.grad for p in model.core.unet.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_normals_metrics_and_preview():
    model = GeometryEstimator(tiny=TinySpec(seed=0), task="normals")
    batch = normals_batch()
    prediction = model.predict_image(batch["rgb"])
    assert prediction.shape == (2, 3, 32, 48)
    model.task.update_metrics(model.val_metrics, batch["normals"], batch)
    values = model.val_metrics.compute()
    assert values["mean"] < 0.1 and values["a5"] == 100.0
    row = model.task.preview_row(prediction, batch, 0)
    assert row.shape == (3, 32, 4 * 48) and 0 <= row.min() and row.max() <= 1


def test_pixels_without_a_ground_truth_normal_are_not_counted():
    """A sample stored without normals has zero targets on valid pixels: they must not act as 90-degree errors."""
    task = NormalsTask()
    batch = normals_batch()
    prediction = batch["normals"].clone()
    batch["normals"][1] = 0.0  # second sample: depth-valid pixels but no normals
    assert task.valid_mask(batch)[1].sum() == 0 and task.valid_mask(batch)[0].sum() == batch["mask"][0].sum()
    assert task.loss(prediction, batch) < 2e-3
    metrics = task.make_metrics(EvalSpec(min_depth=0.0, max_depth=80.0))
    task.update_metrics(metrics, prediction, batch)
    assert metrics.compute()["mean"] < 0.1
