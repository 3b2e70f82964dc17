"""The LightningCLI driven in-process: fit for both objectives, checkpoints, validate from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.__main__ import main
from experiments.config_defaults import expand_config_defaults
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import DiffusionObjective
from tests.helpers import ROOT, tiny_run_args


@pytest.mark.parametrize("model", ["e2e_depth_tiny", "diffusion_depth_tiny"])
def test_fit_fast_dev_run(tmp_path, shard_cache, model):
    cli = main(["fit", *tiny_run_args(tmp_path, model, shard_cache), "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.datamodule.decode_normals is False  # a depth model: normals.png is never decoded


def test_normals_model_decodes_normals_and_refuses_them_off(tmp_path, shard_cache):
    args = tiny_run_args(tmp_path, "e2e_normals_tiny", shard_cache)
    cli = main(["fit", *args, "--trainer.fast_dev_run=true"])
    assert cli.datamodule.decode_normals is True and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    with pytest.raises(SystemExit, match="decode_normals is false, but the 'normals' task reads normals"):
        main(["fit", *args, "--trainer.fast_dev_run=true", "--data.init_args.decode_normals=false"])


def test_fit_checkpoint_then_validate(tmp_path, shard_cache):
    args = tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache)
    fit = main(
        ["fit", *args, "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--batch.effective_batch_size=4"]
    )
    assert fit.trainer.accumulate_grad_batches == 2  # 4 = micro-batch 2 x 1 device x 2
    assert fit.trainer.global_step == 4
    ckpt_path = fit.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(ckpt_path, weights_only=False)
    assert not any(k.startswith("core.vae.") for k in checkpoint["state_dict"])
    assert any(k.startswith("core.unet.") for k in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert "val/abs_rel" in fit.trainer.callback_metrics

    validated = main(["validate", *args, "--ckpt_path", ckpt_path])
    metrics = validated.trainer.callback_metrics
    assert set(metrics) >= {"val/abs_rel", "val/delta1", "val/rmse", "val/silog", "val/i_rmse"}
    # Same weights, same validation data: the metric is reproduced exactly from the checkpoint.
    assert metrics["val/abs_rel"].item() == pytest.approx(fit.trainer.callback_metrics["val/abs_rel"].item(), rel=1e-5)
    trained = fit.model.core.unet.conv_out.weight
    torch.testing.assert_close(validated.model.core.unet.conv_out.weight, trained)


def test_bf16_mixed_fast_dev_run(tmp_path, shard_cache):
    cli = main(["fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache),
                "--trainer.fast_dev_run=true", "--trainer.precision=bf16-mixed"])  # fmt: skip
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_wrong_config_key_is_a_clear_error(tmp_path, shard_cache, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache), "--model.init_args.learning_rate=1"])
    assert "learning_rate" in capsys.readouterr().err


def test_config_defaults_expand_before_the_file(tmp_path):
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "a.yaml").write_text("trainer:\n  max_steps: 1\n")
    (tmp_path / "b.yaml").write_text("defaults: [group/a.yaml]\ntrainer:\n  max_steps: 2\n")
    expanded = expand_config_defaults(["fit", "--config", str(tmp_path / "b.yaml"), "--trainer.devices=1"])
    assert expanded == [
        "fit", "--config", str(tmp_path / "group" / "a.yaml"), "--config", str(tmp_path / "b.yaml"), "--trainer.devices=1"
    ]  # fmt: skip
    (tmp_path / "c.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        expand_config_defaults(["--config", str(tmp_path / "c.yaml")])


def test_demo_config_composes(tmp_path, tiny_sd2_folder):
    cli = main(
        ["--config", str(ROOT / "configs/demo.yaml"), f"--data.init_args.synthetic.cache_dir={tmp_path}",
         f"--model.init_args.pretrained={tiny_sd2_folder}"],
        run=False,
    )  # fmt: skip
    assert cli.config.trainer.max_steps == 1500
    assert type(cli.model.objective).__name__ == "E2EObjective"
    assert cli.datamodule.batch_size == 4
    assert cli.model.core.unet.config.in_channels == 8  # the SD2-layout UNet was widened


def test_test_and_predict_subcommands(tmp_path, shard_cache):
    args = tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache)
    tested = main(["test", *args])
    assert "test/abs_rel" in tested.trainer.callback_metrics
    tables = list((tmp_path / "runs").rglob("metrics_val.md"))
    assert len(tables) == 1 and "AbsRel (%)" in tables[0].read_text()
    predicted = main(list(args), run=False)
    outputs = predicted.trainer.predict(predicted.model, datamodule=predicted.datamodule)  # public return value
    depth = torch.cat([o["depth"] for o in outputs])
    keys = [k for o in outputs for k in o["key"]]
    assert depth.shape == (len(keys), 1, 32, 48) and 0 <= depth.min() and depth.max() <= 1
    # PredictionWriter: the files `infer` writes, one stem per sample key, in the run folder
    folder = Path(predicted.trainer.log_dir) / "predictions"
    for key, expected in zip(keys, depth):
        np.testing.assert_array_equal(np.load(folder / f"{key}_depth.npy"), expected[0].numpy())
        assert (folder / f"{key}_depth_16bit.png").is_file() and (folder / f"{key}_depth_colored.png").is_file()
    assert len(list(folder.glob("*_depth.npy"))) == len(keys)


def test_checkpoint_rebuilds_its_objective_without_the_cli(tmp_path, shard_cache):
    """A diffusion run's checkpoint loads as a diffusion model: the objective is in the saved hyperparameters."""
    args = tiny_run_args(tmp_path, "diffusion_depth_tiny", shard_cache)
    fit = main(["fit", *args, "--trainer.max_steps=1", "--model.init_args.objective.init_args.noise_levels=3"])
    loaded = GeometryEstimator.load_from_checkpoint(fit.trainer.checkpoint_callback.last_model_path, weights_only=False)
    assert isinstance(loaded.objective, DiffusionObjective) and loaded.objective.noise_levels == 3
    torch.testing.assert_close(loaded.core.unet.conv_out.weight, fit.model.core.unet.conv_out.weight)
