"""`python -m experiments predict` writes its predictions: the same files as `experiments.infer`, one stem per key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Write each predicted sample as `<output_dir>/<key>_*` through its task's `write_outputs`.

    Args:
        output_dir: folder for the files; None = `<run folder>/predictions` (the trainer's log_dir).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.folder: Path | None = None
        self.written = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: resolved once here, on every rank
        base = self.output_dir or (Path(log_dir) / "predictions" if log_dir else Path("predictions"))
        self.folder, self.written = Path(base), 0

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not prediction or self.folder is None:
            return  # a batch of padding only
        task = pl_module.task
        uncertainty = prediction.get("uncertainty")
        for i, key in enumerate(prediction["key"]):
            unc = uncertainty[i] if uncertainty is not None else None
            task.write_outputs(self.folder / key, prediction[task.name][i], unc)
            self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(
            trainer.strategy.reduce(torch.tensor(float(self.written), device=pl_module.device), reduce_op="sum")
        )
        if trainer.is_global_zero:
            print(f"predict: wrote {total} predictions to {self.folder}")
