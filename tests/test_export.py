"""Export to stock diffusers Marigold pipeline folders (depth and normals): layout, parity with predict_image,
round trip, CLI, and the normals frame relative to diffusers' conventions."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, MarigoldDepthPipeline, MarigoldNormalsPipeline
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from PIL import Image

from experiments.export import main as export_main
from lightning_modules.export import pipeline_class
from lightning_modules.inference import InferenceSpec, inference_scheduler, sample_latent
from lightning_modules.module import GeometryEstimator
from lightning_modules.tasks import build_task
from lightning_modules.tiny import TinySpec
from lightning_modules.visualize import normals_to_rgb
from tests.helpers import export_model
from tests.toy_task import ToyDisparityTask


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def perturbed_tiny_model(seed: int = 0, task: str = "depth") -> GeometryEstimator:
    """Tiny model whose UNet is nudged away from its initialisation so outputs are not trivial."""
    model = GeometryEstimator(tiny=TinySpec(seed=0), task=task).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.core.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def model() -> GeometryEstimator:
    return perturbed_tiny_model()


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    """An image in [0,1], [1,3,64,96] (multiple of the VAE factor 8, so the pipeline neither pads nor resizes)."""
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))


def load(folder: Path, cls: type[DiffusionPipeline] = MarigoldDepthPipeline) -> DiffusionPipeline:
    """The stock pipeline `cls` from an exported folder, without progress bars."""
    pipeline = cls.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run_native(pipeline: MarigoldDepthPipeline, rgb: torch.Tensor, steps: int, **kwargs):
    """The pipeline in our E2E setting: zero initial latent, native resolution, one member."""
    return pipeline(
        rgb,
        num_inference_steps=steps,
        ensemble_size=1,
        processing_resolution=0,
        latents=torch.zeros(1, 4, rgb.shape[-2] // 8, rgb.shape[-1] // 8),
        output_type="pt",
        match_input_resolution=True,
        **kwargs,
    )


def ours(model: GeometryEstimator, rgb: torch.Tensor, steps: int) -> torch.Tensor:
    """predict_image (trailing, zeros) mapped to the pipeline's [0,1] depth."""
    return (model.predict_image(rgb * 2 - 1, InferenceSpec(num_steps=steps)) + 1) / 2


@pytest.fixture(scope="module")
def folder(model: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(model, tmp_path_factory.mktemp("export") / "pipe", processing_resolution=64)


def test_layout_and_configs(folder: Path, model: GeometryEstimator) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldDepthPipeline"
    assert index["prediction_type"] == "depth" and index["scale_invariant"] and index["shift_invariant"]
    assert index["default_denoising_steps"] == 1 and index["default_processing_resolution"] == 64
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert {k: scheduler[k] for k in ("clip_sample", "thresholding", "steps_offset", "timestep_spacing")} == {
        "clip_sample": False, "thresholding": False, "steps_offset": 1, "timestep_spacing": "trailing"
    }  # fmt: skip
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is False
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (
        0.00085, 0.012, "scaled_linear"
    )  # fmt: skip
    assert scheduler["set_alpha_to_one"] is True
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 8


def test_stock_pipeline_runs_with_defaults(folder: Path) -> None:
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    prediction = load(folder)(image).prediction
    assert prediction.shape == (1, 64, 64, 1)
    assert np.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1
    assert prediction.std() > 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_pipeline_matches_predict_image(folder: Path, model: GeometryEstimator, rgb: torch.Tensor, steps: int) -> None:
    # With set_alpha_to_one the pipeline's last prev_sample is exactly x0 (sqrt(1)*x0 + sqrt(0)*eps).
    pipeline_depth = run_native(load(folder), rgb, steps).prediction
    torch.testing.assert_close(pipeline_depth, ours(model, rgb, steps), atol=1e-6, rtol=0)


def test_non_divisor_steps_end_at_t0_in_the_pipeline(folder: Path, model: GeometryEstimator, rgb: torch.Tensor) -> None:
    # diffusers' DDIM takes prev_t = t - 1000 // N; for N = 7 the last trailing step is t = 142 -> prev_t = 0,
    # which uses alphas_cumprod[0] (0.99915), not final_alpha_cumprod: a small re-noise remains.
    difference = (run_native(load(folder), rgb, 7).prediction - ours(model, rgb, 7)).abs().max()
    assert 0 < difference < 0.05


def test_published_scheduler_renoises_the_last_step(
    model: GeometryEstimator, rgb: torch.Tensor, tmp_path: Path
) -> None:
    folder = export_model(model, tmp_path / "pipe", processing_resolution=64, set_alpha_to_one=False)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["set_alpha_to_one"] is False
    output = run_native(load(folder), rgb, 1, output_latent=True)
    # Our x0 latent, then DDIM's last update towards alphas_cumprod[0] from a zero latent at t = 999:
    # eps = (0 - sqrt(a999) x0) / sqrt(1 - a999), prev = sqrt(a0) x0 + sqrt(1 - a0) eps = c x0 with c ~ 0.99758.
    z_rgb = model.core.encode(rgb * 2 - 1)
    x0 = sample_latent(
        lambda z, t: model.core.denoise(z_rgb, z, t),
        inference_scheduler(model.core.noise_scheduler),
        torch.zeros_like(z_rgb),
        1,
    )
    a0, a999 = model.core.noise_scheduler.alphas_cumprod[[0, 999]].double()
    c = (a0.sqrt() - (1 - a0).sqrt() * (a999 / (1 - a999)).sqrt()).item()
    assert c == pytest.approx(0.99758, abs=1e-5)
    torch.testing.assert_close(output.latent, c * x0, atol=1e-5, rtol=1e-5)
    difference = (output.prediction - ours(model, rgb, 1)).abs().max()
    assert 1e-5 < difference < 0.01


def test_reload_into_geometry_estimator_reproduces_predictions(
    folder: Path, model: GeometryEstimator, rgb: torch.Tensor
) -> None:
    reloaded = GeometryEstimator(pretrained=str(folder)).eval()
    assert torch.equal(reloaded.core.empty_text_embedding, model.core.empty_text_embedding)
    for steps in (1, 4):
        assert torch.equal(reloaded.predict_image(rgb * 2 - 1, InferenceSpec(num_steps=steps)),
                           model.predict_image(rgb * 2 - 1, InferenceSpec(num_steps=steps)))  # fmt: skip


def test_mismatched_text_encoder_is_rejected(model: GeometryEstimator, tmp_path: Path) -> None:
    padded = GeometryEstimator(tiny=TinySpec(seed=0), prompt_padding="max_length")
    with pytest.raises(ValueError, match="empty-prompt embedding"):
        export_model(padded, tmp_path / "padded")
    other = export_model(GeometryEstimator(tiny=TinySpec(seed=1)), tmp_path / "other", processing_resolution=64)
    with pytest.raises(ValueError, match="does not reproduce"):
        export_model(model, tmp_path / "wrong", tokenizer_source=str(other))


def test_export_command(tmp_path: Path, rgb: torch.Tensor, capsys: pytest.CaptureFixture[str]) -> None:
    trained = perturbed_tiny_model(seed=5)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("vae.")}  # as checkpoints store it
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state}, ckpt)
    # Shaped like the config.yaml a `fit` run saves: data and ckpt_path are ignored by the export.
    config = {
        "seed_everything": 0,
        "ckpt_path": None,
        "weights_only": None,  # Lightning 2.6's fit writes it; the model-only CLI rejects it
        "model": {"class_path": "lightning_modules.module.GeometryEstimator", "init_args": {"tiny": {"seed": 0}}},
        "data": {"class_path": "datamodules.not_needed.DataModule", "init_args": {"batch_size": 2}},
        "trainer": {"accelerator": "gpu", "devices": 4, "strategy": "ddp", "logger": False},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "exported"
    args = ["--config", str(config_path), "--ckpt_path", str(ckpt), "--out", str(out), "--processing_resolution", "64"]
    export_main(args)
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "MarigoldDepthPipeline.from_pretrained" in printed
    torch.testing.assert_close(run_native(load(out), rgb, 1).prediction, ours(trained, rgb, 1), atol=1e-6, rtol=0)

    with pytest.raises(SystemExit):
        export_main(["--config", str(config_path), "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(out)])
    assert "missing.ckpt does not exist" in capsys.readouterr().err


def test_pipeline_class_follows_the_task() -> None:
    assert pipeline_class(build_task("depth")) is MarigoldDepthPipeline
    assert pipeline_class(build_task("normals")) is MarigoldNormalsPipeline
    with pytest.raises(ValueError, match="no diffusers pipeline"):
        pipeline_class(ToyDisparityTask())


# ------------------------------------------------------------------------------------------------- normals
@pytest.fixture(scope="module")
def normals_model() -> GeometryEstimator:
    return perturbed_tiny_model(task="normals")


@pytest.fixture(scope="module")
def normals_folder(normals_model: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(normals_model, tmp_path_factory.mktemp("export") / "normals", processing_resolution=64)


@pytest.fixture(scope="module")
def rgb_square() -> torch.Tensor:
    """A 64x64 image in [0,1] (multiple of 8: the pipeline neither pads nor resizes at processing_resolution=0)."""
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def ours_decoded(model: GeometryEstimator, rgb: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """The decoded VAE image that predict_image turns into normals (zero initial latent, trailing)."""
    z_rgb = model.core.encode(rgb * 2 - 1)
    denoiser = lambda z, t: model.core.denoise(z_rgb, z, t)  # noqa: E731
    z_0 = sample_latent(denoiser, inference_scheduler(model.core.noise_scheduler), torch.zeros_like(z_rgb), steps)
    return model.core.decode(z_0)


def test_normals_layout(normals_folder: Path) -> None:
    index = json.loads((normals_folder / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldNormalsPipeline"
    assert index["prediction_type"] == "normals" and index["use_full_z_range"] is True
    assert "scale_invariant" not in index and "shift_invariant" not in index
    assert index["default_denoising_steps"] == 1 and index["default_processing_resolution"] == 64
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    scheduler = json.loads((normals_folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["set_alpha_to_one"] is True and scheduler["clip_sample"] is False
    assert scheduler["steps_offset"] == 1 and scheduler["prediction_type"] == "v_prediction"


def test_normals_stock_pipelines_load_and_run_with_defaults(normals_folder: Path) -> None:
    generic = DiffusionPipeline.from_pretrained(normals_folder)
    assert type(generic) is MarigoldNormalsPipeline
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    # Gaussian initial latent, default steps and resolution
    prediction = load(normals_folder, MarigoldNormalsPipeline)(image).prediction
    assert prediction.shape == (1, 64, 64, 3) and np.isfinite(prediction).all()
    np.testing.assert_allclose(np.linalg.norm(prediction, axis=-1), 1.0, atol=1e-5)
    assert prediction.std(axis=(0, 1, 2)).min() > 1e-2


def test_normals_pipeline_matches_predict_image(
    normals_folder: Path, normals_model: GeometryEstimator, rgb_square: torch.Tensor
) -> None:
    output = load(normals_folder, MarigoldNormalsPipeline)(
        rgb_square,
        num_inference_steps=1,
        ensemble_size=1,
        processing_resolution=0,
        latents=torch.zeros(1, 4, 8, 8),
        output_type="pt",
        output_latent=True,
    )
    pipeline_normals = output.prediction
    ours = normals_model.predict_image(rgb_square * 2 - 1, InferenceSpec(num_steps=1))
    decoded = ours_decoded(normals_model, rgb_square)
    assert pipeline_normals.shape == ours.shape == (1, 3, 64, 64)
    assert ours.std(dim=(0, 2, 3)).min() > 0.1  # non-trivial output

    # Same latent (set_alpha_to_one: the last prev_sample is x0) ...
    z_rgb = normals_model.core.encode(rgb_square * 2 - 1)
    z_0 = sample_latent(lambda z, t: normals_model.core.denoise(z_rgb, z, t),
                        inference_scheduler(normals_model.core.noise_scheduler), torch.zeros_like(z_rgb), 1)  # fmt: skip
    torch.testing.assert_close(output.latent, z_0, atol=1e-6, rtol=0)
    # ... and exactly diffusers' post-processing of our decoded image: clip to [-1, 1], then divide by max(norm, 1e-6).
    clipped = decoded.clamp(-1, 1)
    torch.testing.assert_close(
        pipeline_normals, clipped / clipped.norm(dim=1, keepdim=True).clamp(min=1e-6), atol=1e-6, rtol=0
    )

    # Same frame, channel for channel: where the decoder stays inside [-1, 1] the two rules differ only by the
    # epsilon (ours: x / (|x| + 1e-5)), so |difference| <= 1e-5 / |x| per element; no channel is negated or swapped.
    norm = decoded.norm(dim=1, keepdim=True)
    inside = (decoded.abs() <= 1).all(dim=1, keepdim=True).expand_as(decoded)
    bound = 1e-5 / norm.expand_as(decoded) + 1e-6
    difference = (pipeline_normals - ours).abs()
    assert inside.float().mean() > 0.9
    assert (difference[inside] <= bound[inside]).all(), (difference[inside] - bound[inside]).max()
    for channel in range(3):
        assert (pipeline_normals[:, channel] * ours[:, channel] >= 0)[inside[:, channel]].all()
    # Where a decoded channel overshoots, diffusers clips before normalising and we after: directions differ.
    if (~inside).any():
        assert difference[~inside].max() > 1e-3


def test_normals_visualization_flags_relative_to_our_frame(normals_folder: Path, rgb_square: torch.Tensor) -> None:
    # A plane facing left in our frame (x left, y up, z towards the viewer) is n = (1, 0, 0).
    left = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    facing = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    # diffusers' default flags colour (n + 1) / 2 like our previews: no flip is applied by default.
    assert np.asarray(MarigoldImageProcessor.visualize_normals(left)[0])[0, 0].tolist() == [255, 127, 127]
    assert np.asarray(MarigoldImageProcessor.visualize_normals(facing)[0])[0, 0].tolist() == [127, 127, 255]
    # flip_x converts to the frame the diffusers docstring documents (x right): the left plane gets red 0.
    copy = left.clone()
    assert np.asarray(MarigoldImageProcessor.visualize_normals(copy, flip_x=True)[0])[0, 0].tolist() == [0, 127, 127]
    # (diffusers 0.42 applies the flip to the caller's tensor in place, hence the copy.)
    # A whole predicted map: default colours = our normals_to_rgb, up to uint8 truncation.
    prediction = load(normals_folder, MarigoldNormalsPipeline)(rgb_square, output_type="pt").prediction
    colours = np.asarray(MarigoldImageProcessor.visualize_normals(prediction.clone())[0]).astype(np.float64)
    expected = normals_to_rgb(prediction[0]).permute(1, 2, 0).numpy() * 255
    assert np.abs(colours - expected).max() <= 1.0


def test_normals_reload_into_geometry_estimator_reproduces_predictions(
    normals_folder: Path, normals_model: GeometryEstimator, rgb_square: torch.Tensor
) -> None:
    reloaded = GeometryEstimator(pretrained=str(normals_folder), task="normals").eval()
    assert reloaded.task.name == "normals"
    assert torch.equal(reloaded.core.empty_text_embedding, normals_model.core.empty_text_embedding)
    for steps in (1, 4):
        spec = InferenceSpec(num_steps=steps)
        assert torch.equal(
            reloaded.predict_image(rgb_square * 2 - 1, spec), normals_model.predict_image(rgb_square * 2 - 1, spec)
        )


def test_export_rejects_bad_denoising_steps(normals_model: GeometryEstimator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="denoising_steps"):
        export_model(normals_model, tmp_path / "x", processing_resolution=64, denoising_steps=0)


def test_export_command_with_the_normals_config(tmp_path: Path, rgb_square: torch.Tensor) -> None:
    """configs/model/e2e_normals_tiny.yaml builds a normals model; the CLI exports it as MarigoldNormalsPipeline."""
    trained = perturbed_tiny_model(seed=7, task="normals")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {k: v for k, v in trained.state_dict().items() if not k.startswith("vae.")}}, ckpt)
    config = Path(__file__).resolve().parents[1] / "configs" / "model" / "e2e_normals_tiny.yaml"
    out = tmp_path / "exported"
    export_main(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out), "--processing_resolution", "64"])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "MarigoldNormalsPipeline"
    latents = torch.zeros(1, 4, 8, 8)
    pipeline = load(out, MarigoldNormalsPipeline)
    prediction = pipeline(rgb_square, processing_resolution=0, latents=latents, output_type="pt").prediction
    decoded = ours_decoded(trained, rgb_square).clamp(-1, 1)
    expected = decoded / decoded.norm(dim=1, keepdim=True).clamp(min=1e-6)
    torch.testing.assert_close(prediction, expected, atol=1e-6, rtol=0)


def test_export_refuses_a_non_empty_folder_and_replaces_atomically(
    model: GeometryEstimator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(model, out, processing_resolution=64)
    assert (out / "notes.txt").read_text() == "mine"  # nothing touched

    # A failing export leaves the old folder exactly as it was and no temporary folder behind.
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MarigoldDepthPipeline, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, out, processing_resolution=64, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    monkeypatch.undo()
    export_model(model, out, processing_resolution=64, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_export_command_refuses_a_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, ckpt, out = tmp_path / "c.yaml", tmp_path / "x.ckpt", tmp_path / "out"
    config.write_text("model: {}\n")
    ckpt.write_bytes(b"")
    out.mkdir()
    (out / "a").write_text("")
    with pytest.raises(SystemExit):
        export_main(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err
