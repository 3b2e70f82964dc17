"""`metrics_<dataset>.csv` / `.md` in the run folder at the end of `test`."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_modules.evaluation import write_tables


class MetricTableWriter(Callback):
    """Write the module's `test_results` (values, image count) with its task's columns into the log folder."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir  # a collective under DDP: every rank asks
        results = getattr(pl_module, "test_results", None)
        if not trainer.is_global_zero or folder is None or results is None:
            return
        values, images = results
        write_tables(folder, pl_module.evaluation.dataset, images, values, pl_module.task.columns)
