"""The SD2 stand-in: both pretraining stages run, the SD2-layout folder round trip, the cached builder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from experiments import standin
from experiments.__main__ import main
from lightning_modules.components import load_pretrained_components
from lightning_modules.module import GeometryEstimator
from lightning_modules.standin_folder import save_sd2_folder
from tests.helpers import ROOT

TINY_DATA = str(ROOT / "tests/configs/tiny_data.yaml")
# Small and fast: the tiny data, 3 steps, validation at the end.
STAGE_OVERRIDES = [
    "--config", TINY_DATA,
    "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]  # fmt: skip


def _stage_args(tmp_path, config: str, cache) -> list[str]:
    return [
        "fit", "--config", str(ROOT / f"configs/standin/{config}.yaml"), *STAGE_OVERRIDES,
        f"--data.init_args.synthetic.cache_dir={cache}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory, shard_cache):
    tmp = tmp_path_factory.mktemp("autoencoder")
    cli = main(_stage_args(tmp, "autoencoder", shard_cache))
    folder = tmp / "vae"
    cli.model.vae.save_pretrained(folder)
    return cli, folder


def test_autoencoder_stage_trains_all_kinds_and_sets_the_latent_scale(trained_autoencoder):
    cli, folder = trained_autoencoder
    metrics = cli.trainer.callback_metrics
    for name in ("val/rgb_psnr", "val/depth_error_pct", "val/normals_error_deg"):
        assert torch.isfinite(metrics[name]), name
    assert {"train/l1_rgb", "train/l1_depth", "train/l1_normals"} <= set(metrics)  # 3 steps cycle the 3 kinds
    vae = AutoencoderKL.from_pretrained(folder)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    # The scale is 1 / std of the RGB latents, measured now: re-measure it independently.
    rgb = next(iter(cli.datamodule.val_dataloader()))["rgb"]
    with torch.no_grad():
        std = vae.encode(rgb).latent_dist.mode().std().item()
    assert vae.config.scaling_factor != 0.18215
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.5)


def test_autoencoder_rejects_bad_settings():
    from lightning_modules.autoencoder_pretraining import AutoencoderPretraining

    with pytest.raises(ValueError, match="image kind"):
        AutoencoderPretraining(kinds=["rgb", "sky"])
    with pytest.raises(ValueError, match="multiple of 8"):
        AutoencoderPretraining(crop_size=60)


def test_prior_stage_trains_on_the_autoencoders_latents(tmp_path, trained_autoencoder, shard_cache):
    _, folder = trained_autoencoder
    cli = main([*_stage_args(tmp_path, "prior", shard_cache), f"--model.init_args.autoencoder={folder}"])
    prior = cli.model
    assert prior.unet.config.in_channels == 4
    assert prior.latent_scale == AutoencoderKL.from_pretrained(folder).config.scaling_factor
    assert prior.empty_text_embedding.shape[1] == 77  # SD2 saw the padded empty prompt
    for t in (99, 499, 899):
        assert torch.isfinite(cli.trainer.callback_metrics[f"val/v_loss_t{t}"])
    images = prior.sample(2, (4, 4, 6))
    assert images.shape == (2, 3, 32, 48) and 0 <= images.min() and images.max() <= 1


def test_prior_needs_a_pretrained_autoencoder(tmp_path):
    from lightning_modules.prior_pretraining import ImagePriorPretraining

    with pytest.raises(FileNotFoundError, match="no pretrained autoencoder"):
        ImagePriorPretraining(autoencoder=str(tmp_path / "missing"))


def test_sd2_folder_round_trip(tmp_path, tiny_sd2_folder):
    # Stock diffusers loads it as a text-to-image pipeline and samples from it.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_folder)
    assert pipe.unet.config.in_channels == 4 and pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("", num_inference_steps=2, height=32, width=32, guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and image.min() >= 0 and image.max() <= 1
    # `pretrained:` loads it the way it loads stabilityai/stable-diffusion-2: conv_in widened to 8 channels.
    saved = UNet2DConditionModel.from_pretrained(tiny_sd2_folder, subfolder="unet").conv_in
    for rule, bias_factor in (("e2e_ft", 0.5), ("marigold", 1.0)):
        model = GeometryEstimator(pretrained=str(tiny_sd2_folder), conv_in_rule=rule)
        conv = model.core.unet.conv_in
        assert conv.in_channels == 8 and model.core.unet.config.in_channels == 8
        torch.testing.assert_close(conv.weight[:, :4], saved.weight * 0.5)
        torch.testing.assert_close(conv.weight[:, 4:], saved.weight * 0.5)
        torch.testing.assert_close(conv.bias, saved.bias * bias_factor)
    scheduler = load_pretrained_components(str(tiny_sd2_folder)).scheduler
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "v_prediction"


def test_sd2_folder_refuses_an_eight_channel_unet(tmp_path):
    unet = UNet2DConditionModel(in_channels=8, out_channels=4, block_out_channels=(32, 64), norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    with pytest.raises(ValueError, match="4 input channels"):
        save_sd2_folder(unet, None, None, None, tmp_path / "x")


def test_builder_caches_resumes_and_resolves(tmp_path, monkeypatch, shard_cache):
    monkeypatch.setenv("DGFT_CACHE", str(tmp_path / "cache"))
    overrides = [*STAGE_OVERRIDES, f"--data.init_args.synthetic.cache_dir={shard_cache}"]
    calls = []
    original = standin._run_stage

    def counting(stage, entry, extra):
        calls.append(stage)
        if stage == "prior" and calls.count("prior") == 1:
            raise KeyboardInterrupt  # interrupted in stage 2: stage 1's output must survive
        return original(stage, entry, extra)

    monkeypatch.setattr(standin, "_run_stage", counting)
    with pytest.raises(KeyboardInterrupt):
        standin.build_standin(overrides)
    entry = standin.standin_dir(overrides)
    assert (entry / "autoencoder" / "config.json").is_file() and not (entry / "sd2").exists()
    folder = standin.build_standin(overrides)
    assert calls == ["autoencoder", "prior", "prior"]  # stage 1 not redone
    assert folder == entry / "sd2" and (folder / "model_index.json").is_file()
    report = json.loads((entry / standin.REPORT).read_text())
    assert {"autoencoder", "prior"} <= set(report) and report["autoencoder"]["scaling_factor"] > 0
    assert standin.build_standin(overrides) == folder and len(calls) == 3  # cached: nothing runs
    assert standin.standin_dir(overrides) != standin.standin_dir([])  # settings are part of the key


def test_cli_resolves_the_standin_scheme(tmp_path, monkeypatch, tiny_sd2_folder, shard_cache):
    monkeypatch.setenv("DGFT_CACHE", str(tmp_path / "cache"))
    import shutil

    shutil.copytree(tiny_sd2_folder, standin.standin_dir() / "sd2")  # as if built: nothing to train here
    cli = main(
        ["--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config", str(ROOT / "configs/model/e2e_depth_standin.yaml"),
         "--config", TINY_DATA, f"--data.init_args.synthetic.cache_dir={shard_cache}"],
        run=False,
    )  # fmt: skip
    assert cli.model.hparams.pretrained == str(standin.standin_dir() / "sd2")
    assert cli.model.core.unet.config.in_channels == 8
    with pytest.raises(ValueError, match="unknown stand-in"):
        standin.resolve_pretrained("standin:sd9")


def test_other_ranks_wait_for_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("DGFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(standin, "build_standin", lambda *a, **k: pytest.fail("only rank 0 builds"))
    with pytest.raises(TimeoutError, match="rank 0"):
        standin.wait_for_standin(standin.standin_dir() / "sd2", timeout_s=0.0, poll_s=0.0)
    (standin.standin_dir() / "sd2").mkdir(parents=True)
    (standin.standin_dir() / "sd2" / "model_index.json").write_text("{}")
    assert standin.resolve_pretrained("standin:sd2") == str(standin.standin_dir() / "sd2")
