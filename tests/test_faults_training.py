"""Nothing to learn from must not look like training: valid-pixel fraction, empty micro-batches, the stop, and
validations without a scorable image (issue 12, training and evaluation signals)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.shard_format import encode_sample
from datamodules.shard_writer import ShardWriter
from experiments.__main__ import main
from lightning_modules.metrics import DepthMetrics, NormalMetrics
from lightning_modules.module import GeometryEstimator, NoValidPixelsError, NoValidPixelsWarning
from lightning_modules.tiny import TinySpec
from tests.helpers import fake_batch, logged_scalars, tiny_run_args

H, W = 32, 48  # the tiny data config's size
VALID_ROWS = 12  # partially valid samples: the top 12 of 32 rows (pixel fraction 0.375, latent cells 1 of 4 rows)


def write_train_shards(folder: Path, kind: str, count: int = 4) -> str:
    """Training shards of `count` samples: `constant` depth (3 m everywhere) or `partial` (a depth ramp, valid in
    the top VALID_ROWS rows only); returns their glob."""
    ramp = np.tile(np.linspace(1.0, 5.0, W, dtype=np.float32), (H, 1))
    with ShardWriter(folder, "train", samples_per_shard=2) as writer:
        for i in range(count):
            rgb = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
            mask = np.ones((H, W), bool)
            if kind == "constant":
                depth = np.full((H, W), 3.0, np.float32)
            else:
                depth = ramp + 0.1 * i
                mask[VALID_ROWS:] = False
            writer.write(encode_sample(f"{kind}{i}", rgb, depth, mask, meta={"source": kind}))
    return str(folder / "train-*.tar")


def fit(tmp_path: Path, shard_cache: Path, *extra: str, model: str = "e2e_depth_tiny"):
    return main(
        ["fit", *tiny_run_args(tmp_path, model, shard_cache), "--trainer.log_every_n_steps=1", *extra]
    )  # fmt: skip


def messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NoValidPixelsWarning)]


# --------------------------------------------------------------------------------------------- training
def test_depth_range_excluding_every_pixel_warns_then_stops_with_a_clear_error(tmp_path, shard_cache):
    # The synthetic rooms are 1-10 m deep: a 0.5 m maximum leaves no valid pixel in any micro-batch.
    with warnings.catch_warnings(record=True) as record, pytest.raises((NoValidPixelsError, SystemExit)) as stop:
        warnings.simplefilter("always")
        fit(tmp_path, shard_cache, "--data.init_args.max_depth=0.5", "--model.init_args.max_empty_batches=3",
            "--trainer.max_steps=10")  # fmt: skip
    text = str(stop.value)
    assert "3 consecutive micro-batches (optimiser steps 0 to 2) had no valid pixel" in text
    assert "--data.init_args.min_depth / --data.init_args.max_depth (now 1e-05 to 0.5 m)" in text
    assert "constant depth" in text and "--model.init_args.max_empty_batches=3 (0 = never stop)" in text
    assert "Traceback" not in text and "synthetic-train-" in text  # the keys of the last micro-batch
    warned = messages(record)
    assert len(warned) == 1  # the first empty micro-batch; the third one stops
    assert warned[0].startswith("micro-batch without a valid pixel at optimiser step 0 (batch keys synthetic-train-")
    assert "max_depth (now 1e-05 to 0.5 m)" in warned[0] and "masks" in warned[0]
    run = tmp_path / "runs" / "default" / "version_0"
    assert logged_scalars(run, "train/valid_fraction") == [(0, 0.0), (1, 0.0)]
    assert logged_scalars(run, "train/empty_batches") == [(0, 1.0), (1, 2.0)]


def test_constant_depth_is_counted_warned_once_per_ten_and_never_stops_at_zero(tmp_path, shard_cache):
    shards = write_train_shards(tmp_path / "constant", "constant")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = fit(tmp_path, shard_cache, f"--data.init_args.train_shards={shards}", "--trainer.max_steps=12",
                  "--trainer.val_check_interval=12", "--model.init_args.max_empty_batches=0")  # fmt: skip
    assert cli.trainer.global_step == 12 and cli.model.empty_batches == 12
    warned = [m for m in messages(record) if m.startswith("micro-batch")]
    assert [m.split(" (batch keys")[0] for m in warned] == [
        "micro-batch without a valid pixel at optimiser step 0",
        "micro-batch without a valid pixel at optimiser step 10",
    ]
    assert "11 such micro-batch(es) so far, 11 in a row (training never stops" in warned[1]
    run = cli.trainer.logger.log_dir
    assert [v for _, v in logged_scalars(run, "train/empty_batches")] == [float(k) for k in range(1, 13)]
    assert {v for _, v in logged_scalars(run, "train/valid_fraction")} == {0.0}
    assert {v for _, v in logged_scalars(run, "train/loss")} == {0.0}
    # the synthetic validation rooms are fine: scored and logged
    assert logged_scalars(run, "val/images") == [(11, 4.0)] and len(logged_scalars(run, "val/abs_rel")) == 1


@pytest.mark.parametrize("model", ["e2e_depth_tiny", "diffusion_depth_tiny"])
def test_partially_valid_batches_log_their_pixel_fraction(tmp_path, shard_cache, model):
    shards = write_train_shards(tmp_path / "partial", "partial")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = fit(tmp_path, shard_cache, f"--data.init_args.train_shards={shards}", "--trainer.max_steps=3",
                  model=model)  # fmt: skip
    assert not messages(record)
    run = cli.trainer.logger.log_dir
    assert logged_scalars(run, "train/valid_fraction") == [(s, VALID_ROWS / H) for s in range(3)]
    assert logged_scalars(run, "train/empty_batches") == [(s, 0.0) for s in range(3)]
    assert all(v > 0 for _, v in logged_scalars(run, "train/loss"))
    if model.startswith("diffusion"):  # whole latent cells only: the first of four latent rows
        assert logged_scalars(run, "train/valid_latent_fraction") == [(s, 0.25) for s in range(3)]


def test_stop_counts_consecutive_micro_batches_only():
    model = GeometryEstimator(tiny=TinySpec(seed=0), max_empty_batches=2)
    empty, full = fake_batch(), fake_batch()
    empty["mask"][:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for batch in (empty, full, empty, full):  # never two empty in a row
            model.training_step(batch, 0)
        assert model.empty_batches == 2 and model.consecutive_empty == 0
        model.training_step(empty, 0)
        with pytest.raises(NoValidPixelsError, match="2 consecutive micro-batches"):
            model.training_step(empty, 0)
    with pytest.raises(ValueError, match="max_empty_batches"):
        GeometryEstimator(tiny=TinySpec(seed=0), max_empty_batches=-1)


# ------------------------------------------------------------------------------------------- evaluation
def test_validation_without_a_valid_image_says_so_and_logs_no_nan(tmp_path, shard_cache):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = main(["validate", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache),
                    "--data.init_args.max_depth=0.5"])  # fmt: skip
    warned = messages(record)
    assert len(warned) == 1
    assert warned[0].startswith("val at optimiser step 0: no image of 'val' was scored: none of its 4 image(s) had")
    assert "max_depth (now 1e-05 to 0.5 m)" in warned[0] and "model.init_args.evaluation" in warned[0]
    metrics = cli.trainer.callback_metrics
    assert {k for k in metrics if k.startswith("val/")} == {"val/images"} and metrics["val/images"] == 0
    assert all(float(metrics[k]) == 0 for k in metrics if k.startswith("data/val_skipped_"))  # nothing was corrupt
    run = cli.trainer.logger.log_dir
    assert logged_scalars(run, "val/images") == [(0, 0.0)] and logged_scalars(run, "val/abs_rel") == []


def test_images_without_a_valid_pixel_are_not_scored_nor_counted():
    model = GeometryEstimator(tiny=TinySpec(seed=0))
    batch = fake_batch(b=3)
    batch["mask"][1] = False
    model.validation_step(batch, 0)
    assert model.val_images.compute() == 2 and model.val_seen.compute() == 3
    assert model.val_metrics.skipped == 1
    # a test pass where nothing is scored: warned, table values NaN with 0 images, no NaN logged
    batch["mask"][:] = False
    model.test_step(batch, 0)
    with pytest.warns(NoValidPixelsWarning, match="test at optimiser step 0: no image of 'val' was scored"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            model.on_test_epoch_end()
    values, images = model.test_results
    assert images == 0 and all(math.isnan(v) for v in values.values())


def test_metrics_count_the_images_they_score():
    depth, normals = DepthMetrics(1e-3, 80.0), NormalMetrics()
    mask = torch.ones(3, 1, 4, 4, dtype=torch.bool)
    mask[0] = False
    mask[2] = False
    mask[2, 0, 0, 0] = True  # one valid pixel still scores the image
    depth.update(torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4) + 1, mask)
    normals.update(torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), mask)
    assert depth.scored_images == 2 and normals.scored_images == 2 and normals.count == 17


def test_a_metric_without_scored_images_counts_images_with_a_valid_pixel():
    import tests.toy_task  # noqa: F401  registers toy_disparity, whose metric has no scored_images

    model = GeometryEstimator(tiny=TinySpec(seed=0), task="toy_disparity")
    batch = fake_batch(b=3)
    batch["mask"][0] = False
    model.validation_step(batch, 0)
    assert model.val_images.compute() == 2 and model.val_seen.compute() == 3


def test_skipped_samples_reach_tensorboard_per_reason(tmp_path, shard_cache):
    """A corrupt image in the training and validation shards: counted per reason, logged as data/*skipped_*."""
    with ShardWriter(tmp_path / "shards", "train", samples_per_shard=2) as writer:
        for i in range(4):
            rgb = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
            depth = np.tile(np.linspace(1.0, 5.0, W, dtype=np.float32), (H, 1))
            sample = encode_sample(f"s{i}", rgb, depth, np.ones((H, W), bool), meta={"source": "t"})
            if i == 1:
                sample["rgb.png"] = b"not a png"
            writer.write(sample)
    shards = str(tmp_path / "shards" / "train-*.tar")
    # no shuffle buffer: the corrupt sample is decoded (and counted) when its shard is read, not when drawn from it
    cli = fit(tmp_path, shard_cache, f"--data.init_args.train_shards={shards}", f"--data.init_args.val_shards={shards}",
              "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.init_args.shuffle_buffer=1")  # fmt: skip
    run = Path(cli.trainer.log_dir)
    assert logged_scalars(run, "data/skipped_bad_image")[-1][1] >= 1  # running total over the endless stream
    assert logged_scalars(run, "data/val_skipped_bad_image")[-1][1] == 1  # one pass over the 4 validation samples
    assert logged_scalars(run, "data/val_skipped_truncated_shard")[-1][1] == 0
    assert cli.trainer.callback_metrics["val/images"] == 3
