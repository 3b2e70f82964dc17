"""TensorBoard preview grids of the first validation batches (RGB, ground truth, prediction, error)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_modules.visualize import stack_rows


class PredictionPreviews(Callback):
    """Draw `batches` validation batches as `val/preview_<i>` images (rank 0, loggers with `add_image`).

    Expects the module's `validation_step` to return `{"batch", "prediction"}` and the module to have a `task`.
    """

    def __init__(self, batches: int = 2) -> None:
        self.batches = batches

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not outputs or batch_idx >= self.batches or not trainer.is_global_zero or trainer.sanity_checking:
            return
        logger = trainer.logger
        if logger is None or not hasattr(logger.experiment, "add_image"):
            return
        task, shown, prediction = pl_module.task, outputs["batch"], outputs["prediction"]
        rows = [task.preview_row(prediction, shown, i) for i in range(prediction.shape[0])]  # padding dropped
        logger.experiment.add_image(f"val/preview_{batch_idx}", stack_rows(rows), trainer.global_step)
