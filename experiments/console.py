"""What the console shows: a training bar in optimiser steps, known-harmless warnings and adverts silenced."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from transformers.utils import logging as transformers_logging

# Harmless here, by design or by our setup (each message is matched, nothing else is hidden).
HARMLESS_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen VAE is in eval mode on purpose
    r".*does not have many workers.*",  # worker counts are chosen in the data configs
    r".*Couldn't infer the batch indices fetched from your dataloader.*",  # predict writes by key, not index
    r".*The dirpath has changed from.*",  # a new version folder per run is the intended layout
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
)
ADVERTS = ("`accelerate` was not found", "pip install accelerate", "💡 Tip:")
NOISY_LOGGERS = (
    "diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils", "diffusers",
    "lightning.pytorch.utilities.rank_zero",
)  # fmt: skip


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(advert in message for advert in ADVERTS)


def silence_known_noise() -> None:
    """Filter HARMLESS_WARNINGS, the ADVERTS of diffusers and Lightning, and transformers' weight-loading bars."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    transformers_logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimiser steps up to `max_steps` (runs are step-based: one endless 'epoch')."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where its checkpoint was
        bar.set_description("train steps")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return  # between optimiser steps (gradient accumulation) nothing moves
        if step % max(self.refresh_rate, 1) == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()


def add_step_progress_bar(trainer: Namespace) -> None:
    """Use StepProgressBar unless the config disables the bar or brings its own (a parsed trainer config)."""
    if trainer.get("enable_progress_bar") is False:
        return
    callbacks = list(trainer.get("callbacks") or [])
    for callback in callbacks:
        path = callback.get("class_path", "") if isinstance(callback, Namespace) else type(callback).__name__
        if "ProgressBar" in str(path):
            return
    callbacks.append(Namespace(class_path=f"{__name__}.StepProgressBar", init_args=Namespace()))
    trainer.callbacks = callbacks


def announce_run_folder(trainer: L.Trainer, ckpt_path: Any) -> None:
    """Say where a fit logs and checkpoints (rank zero), and what it resumes from."""
    logger = trainer.logger
    logs = getattr(logger, "log_dir", None) if logger is not None else None
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    where = (
        checkpoint.dirpath
        if checkpoint is not None and checkpoint.dirpath
        else (f"{logs}/checkpoints" if logs else trainer.default_root_dir)
    )
    resume = f", resuming from {ckpt_path}" if ckpt_path else ""
    rank_zero_info(f"fit: logs in {logs or 'no logger'}, checkpoints in {where}{resume}")
