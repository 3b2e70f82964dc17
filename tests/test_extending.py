"""docs/extending.md followed once: a third task (tests/toy_task.py) trains, validates, tests and predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.__main__ import main
from lightning_modules.export import pipeline_class
from lightning_modules.tasks import TASKS, Task, build_task, register_task
from tests.helpers import tiny_run_args
from tests.toy_task import ToyDisparityTask


def test_the_toy_task_is_registered_and_not_exportable() -> None:
    assert TASKS["toy_disparity"] is ToyDisparityTask
    with pytest.raises(ValueError, match="no diffusers pipeline for task 'toy_disparity'"):
        pipeline_class(build_task("toy_disparity"))


def test_an_incomplete_task_cannot_be_built() -> None:
    """A task that forgets a decision fails at construction, instead of silently taking another task's branch."""

    @register_task
    class HalfTask(Task):
        name = "half_task_for_test"

        def target_image(self, batch):  # everything else missing
            return batch["rgb"]

    try:
        with pytest.raises(TypeError, match="abstract"):
            build_task("half_task_for_test")
    finally:
        TASKS.pop("half_task_for_test")
    with pytest.raises(ValueError, match="unknown task 'segmentation'; available: .*toy_disparity"):
        build_task("segmentation")


def test_toy_task_runs_through_every_stage(tmp_path: Path, shard_cache: Path) -> None:
    args = [*tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache), "--model.init_args.task=toy_disparity"]
    fit = main(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert fit.model.task.name == "toy_disparity" and torch.isfinite(fit.trainer.callback_metrics["train/loss"])
    assert "val/disparity_l1" in fit.trainer.callback_metrics
    ckpt = fit.trainer.checkpoint_callback.last_model_path

    main(["test", *args, "--ckpt_path", ckpt])
    (table,) = (tmp_path / "runs").rglob("metrics_val.md")
    assert "| L1 |" in table.read_text()

    predicted = main(list(args), run=False)
    outputs = predicted.trainer.predict(predicted.model, datamodule=predicted.datamodule, ckpt_path=ckpt)
    written = sorted((Path(predicted.trainer.log_dir) / "predictions").glob("*_disparity.npy"))
    assert len(written) == sum(len(o["key"]) for o in outputs) > 0
    first = outputs[0]
    np.testing.assert_array_equal(
        np.load(Path(predicted.trainer.log_dir) / "predictions" / f"{first['key'][0]}_disparity.npy"),
        first["toy_disparity"][0, 0].numpy(),
    )
