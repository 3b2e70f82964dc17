"""Both objectives on the tiny model: x0 parity with diffusers, gradient paths, latent masks."""

import pytest
import torch

from lightning_modules.inference import inference_scheduler
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import DiffusionObjective, E2EObjective, masked_mse, valid_latent_mask
from lightning_modules.tiny import TinySpec
from tests.helpers import fake_batch


@pytest.fixture(scope="module")
def model() -> GeometryEstimator:
    return GeometryEstimator(tiny=TinySpec(seed=0))


def test_x0_at_999_matches_diffusers_step(model):
    output = torch.randn(2, 4, 4, 6)
    z_t = torch.zeros_like(output)
    t = torch.full((2,), 999)
    ours = model.core.predicted_original(output, z_t, t)
    scheduler = inference_scheduler(model.core.noise_scheduler, "trailing")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    theirs = scheduler.step(output, 999, z_t).pred_original_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # v-prediction at t = 999 with a zero latent is a fixed scaling (docs/method.md §1.5).
    torch.testing.assert_close(ours, -0.997667 * output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_x0_other_prediction_types_match_diffusers(prediction_type):
    model = GeometryEstimator(tiny=TinySpec(prediction_type=prediction_type))
    output, z_t = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    scheduler = inference_scheduler(model.core.noise_scheduler, "trailing")
    scheduler.set_timesteps(4)
    t = int(scheduler.timesteps[1])
    theirs = scheduler.step(output, t, z_t).pred_original_sample
    ours = model.core.predicted_original(output, z_t, torch.tensor([t]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_e2e_loss_reaches_unet_through_decoder(model):
    model.zero_grad()
    loss, _ = E2EObjective().training_loss(model.core, model.task, fake_batch())
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert model.core.unet.conv_out.weight.grad is not None and model.core.unet.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.core.vae.parameters())  # frozen


@pytest.mark.parametrize("noise", ["gaussian", "pyramid"])
def test_e2e_noise_options_run(model, noise):
    loss, _ = E2EObjective(noise=noise).training_loss(model.core, model.task, fake_batch())
    assert torch.isfinite(loss)


def test_diffusion_loss_ignores_invalid_latent_cells(model):
    batch = fake_batch()
    objective = DiffusionObjective()
    torch.manual_seed(0)
    loss_a, extras = objective.training_loss(model.core, model.task, batch)
    assert torch.isfinite(loss_a) and 0 < extras["valid_latent_fraction"] < 1
    # The invalid 8x8 corner is exactly one latent cell (the VAE encoder's receptive field is wider, so
    # perturb the target only; only that cell's target latent changes enough to matter if it were counted).
    changed = dict(batch, depth_norm=batch["depth_norm"].clone())
    changed["depth_norm"][:, :, :8, :8] = 1.0
    torch.manual_seed(0)
    loss_b, _ = objective.training_loss(model.core, model.task, changed)
    torch.manual_seed(0)
    everything_valid = dict(changed, mask=torch.ones_like(batch["mask"]))
    loss_c, _ = objective.training_loss(model.core, model.task, everything_valid)
    assert not torch.isclose(loss_b, loss_c)
    loss_a.backward()
    assert model.core.unet.conv_out.weight.grad.abs().sum() > 0


def test_masked_mse_counts_only_valid_elements():
    target = torch.randn(2, 4, 3, 3)
    valid = torch.rand(2, 4, 3, 3) > 0.5
    output = target.where(valid, target + 100.0)  # wrong only where invalid
    assert masked_mse(output, target, valid) == 0
    output = target + valid * 2.0  # off by 2 wherever valid
    assert masked_mse(output, target, valid).item() == pytest.approx(4.0)
    empty = masked_mse(output.requires_grad_(), target, torch.zeros_like(valid))
    empty.backward()
    assert empty == 0 and output.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert masked_mse(output.bfloat16(), target.bfloat16(), valid).dtype == torch.float32


def test_latent_mask_needs_every_pixel_valid():
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    mask[0, 0, 3, 12] = False
    cells = valid_latent_mask(mask, 8, 4)
    assert cells.shape == (1, 4, 2, 2)
    assert cells[0, 0].tolist() == [[True, False], [True, True]]


def test_checkpoint_state_excludes_frozen_vae(model):
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith("core.vae.") for k in keys)
    assert any(k.startswith("core.unet.") for k in keys) and "core.empty_text_embedding" in keys
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_checkpoint_from_before_the_core_loads(model):
    """Checkpoints written before the model core existed stored unet.* and empty_text_embedding at the top."""
    legacy = {
        k.removeprefix("core."): v.clone() + 1 for k, v in model.state_dict().items() if k.startswith("core.unet.")
    }
    checkpoint = {"state_dict": legacy}
    model.on_load_checkpoint(checkpoint)
    assert (
        all(k.startswith("core.") for k in checkpoint["state_dict"])
        and "core.vae.decoder.conv_out.weight" in checkpoint["state_dict"]
    )


def test_stochastic_prediction_does_not_depend_on_batch_position(model):
    from lightning_modules.inference import InferenceSpec

    spec = InferenceSpec(num_steps=2, init_latent="gaussian", seed=5)
    images = fake_batch(b=3)["rgb"]
    together = model.predict_image(images, spec)
    alone = model.predict_image(images[2:3], spec)
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)
    other_seed = model.predict_image(images[2:3], InferenceSpec(num_steps=2, init_latent="gaussian", seed=6))
    assert not torch.allclose(alone, other_seed)
