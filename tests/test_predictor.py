"""predict(): sizes, ranges, exact UNet counts, ensembles, and equality with predict_image on the plain path."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor

from lightning_modules import predictor
from lightning_modules.inference import InferenceSpec
from lightning_modules.module import GeometryEstimator
from lightning_modules.predictor import predict, processing_size
from lightning_modules.tiny import TinySpec

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def depth_model() -> GeometryEstimator:
    return GeometryEstimator(tiny=TinySpec(seed=0)).eval()


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_processing_size_keeps_aspect_and_truncates() -> None:
    assert processing_size(480, 640, 768) == (576, 768)
    assert processing_size(37, 53, 32) == (22, 32)  # 37 * 32 // 53
    assert processing_size(37, 53, 0) == (37, 53)
    with pytest.raises(ValueError):
        processing_size(10, 10, -1)


@pytest.mark.parametrize("size", [(37, 53), (50, 70)])
@pytest.mark.parametrize("resolution", [0, 32])
def test_output_matches_input_size_and_range(
    depth_model: GeometryEstimator, size: tuple[int, int], resolution: int
) -> None:
    result = predict(
        depth_model.core, depth_model.task, images(2, *size), processing_resolution=resolution, batch_size=1
    )
    depth = result["depth"]
    assert depth.shape == (2, 1, *size) and depth.dtype == torch.float32
    assert depth.min() >= 0 and depth.max() <= 1
    assert result["uncertainty"] is None
    assert result["unet_calls"] == 1 * 1 * 2


def test_unet_calls_are_steps_times_members_times_images(depth_model: GeometryEstimator) -> None:
    spec = InferenceSpec(num_steps=2, init_latent="gaussian")
    result = predict(
        depth_model.core,
        depth_model.task,
        images(3, 24, 40),
        processing_resolution=0,
        ensemble_size=2,
        spec=spec,
        batch_size=2,
    )
    assert result["unet_calls"] == 2 * 2 * 3


def test_plain_path_equals_predict_image(depth_model: GeometryEstimator) -> None:
    x = images(2, 48, 64)
    result = predict(depth_model.core, depth_model.task, x, processing_resolution=64)
    expected = (depth_model.predict_image(x * 2 - 1) + 1) / 2
    assert torch.equal(result["depth"], expected)


def test_padding_leaves_multiple_of_eight_images_unchanged_and_unpads(depth_model: GeometryEstimator) -> None:
    x = images(1, 45, 61)
    result = predict(depth_model.core, depth_model.task, x, processing_resolution=0)
    padded, _ = MarigoldImageProcessor.pad_image(x, depth_model.core.vae_scale_factor)
    expected = (depth_model.predict_image(padded * 2 - 1) + 1) / 2
    assert torch.equal(result["depth"], expected[..., :45, :61])


def test_gaussian_ensemble_gives_uncertainty_and_seeds_members(depth_model: GeometryEstimator) -> None:
    spec = InferenceSpec(init_latent="gaussian", seed=7)
    x = images(1, 32, 48)
    result = predict(depth_model.core, depth_model.task, x, processing_resolution=0, ensemble_size=3, spec=spec)
    uncertainty = result["uncertainty"]
    assert uncertainty is not None and uncertainty.shape == (1, 1, 32, 48)
    assert uncertainty.min() >= 0 and uncertainty.max() > 0
    depth = result["depth"]
    assert depth.min() == pytest.approx(0, abs=1e-6) and depth.max() == pytest.approx(1, abs=1e-6)
    # Member 0 uses the spec's own seed; the ensemble of one is that member.
    single = predict(depth_model.core, depth_model.task, x, processing_resolution=0, spec=spec)["depth"]
    assert torch.equal(single, (depth_model.predict_image(x * 2 - 1, spec) + 1) / 2)


def test_deterministic_ensemble_warns_once(depth_model: GeometryEstimator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictor, "_warned_identical_members", False)
    with pytest.warns(UserWarning, match="every member is identical") as record:
        for _ in range(2):
            result = predict(
                depth_model.core, depth_model.task, images(1, 16, 16), processing_resolution=0, ensemble_size=2
            )
    assert len(record) == 1
    assert torch.all(result["uncertainty"] == 0)


def test_normals_are_unit_length_at_input_size() -> None:
    model = GeometryEstimator(tiny=TinySpec(seed=0), task="normals").eval()
    spec = InferenceSpec(init_latent="gaussian")
    result = predict(model.core, model.task, images(1, 37, 53), processing_resolution=32, ensemble_size=2, spec=spec)
    normals = result["normals"]
    assert normals.shape == (1, 3, 37, 53)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(1, 37, 53), atol=1e-5, rtol=0)
    assert result["uncertainty"].shape == (1, 1, 37, 53)
    assert result["unet_calls"] == 2


def test_bf16_autocast_runs_and_restores_training_mode() -> None:
    model = GeometryEstimator(tiny=TinySpec(seed=0)).train()
    result = predict(model.core, model.task, images(1, 24, 24), processing_resolution=0, bf16=True)
    assert result["depth"].dtype == torch.float32 and torch.isfinite(result["depth"]).all()
    assert model.training


def test_images_outside_unit_range_are_refused(depth_model: GeometryEstimator) -> None:
    """The batch contract's [-1, 1] images passed by mistake would predict silently on the wrong input."""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict(depth_model.core, depth_model.task, images(1, 16, 16) * 2 - 1.5)
