"""Two of the three training implementations timed side by side: ours through Lightning, and the bare loop.

Both take the same fixed batch on the device and the same core; each `run` builds a fresh AdamW (its state is
allocated in the warm-up steps), times `iters` steps after `warmup`, and frees the optimiser state and gradients,
so runs can alternate in one process without one's memory carrying over into the next.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from experiments.benchmark.timing import clock
from lightning_modules.core import GeometryCore
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import Objective
from lightning_modules.speed import adamw_options
from lightning_modules.tasks import Task

QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*module\\(s\\) in eval mode.*",  # the frozen VAE
    ".*no `val_dataloader`.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-fit banners and known-harmless warnings off, for one run (restored afterwards)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", pattern)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def adamw(core: GeometryCore, impl: str | None = "auto") -> torch.optim.AdamW:
    """AdamW on the UNet with GeometryEstimator's default hyper-parameters; `impl` as `SpeedSpec.optimizer_impl`,
    None = torch's own default (the reference trainer's)."""
    options = {} if impl is None else adamw_options(core.unet.parameters(), impl)
    return torch.optim.AdamW(core.unet.parameters(), lr=3e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                             **options)  # fmt: skip


def free_gradients(core: GeometryCore) -> None:
    for parameter in core.unet.parameters():
        parameter.grad = None


class StepRunner:
    """The bare PyTorch step: `objective.training_loss(core, task, batch)`, backward, (clip), AdamW step, zero_grad."""

    def __init__(
        self,
        core: GeometryCore,
        task: Task,
        objective: Objective,
        device: torch.device,
        bf16: bool,
        batch: dict[str, Any] | None = None,
        grad_clip: float = 0.0,
        optimizer_impl: str | None = "auto",
    ) -> None:
        self.core, self.task, self.objective, self.device, self.bf16 = core, task, objective, device, bf16
        self.batch, self.grad_clip, self.optimizer_impl = batch, grad_clip, optimizer_impl
        self.optimizer: torch.optim.Optimizer | None = None

    def optimizer_step(self, batch: dict[str, Any]) -> None:
        assert self.optimizer is not None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.objective.training_loss(self.core, self.task, batch)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.core.unet.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        assert self.batch is not None
        self.optimizer_step(self.batch)

    def run(self, warmup: int, iters: int) -> float:
        """Seconds per optimiser step over `iters` steps after `warmup` steps."""
        self.core.train()
        self.optimizer = adamw(self.core, self.optimizer_impl)
        try:
            for _ in range(warmup):
                self.step()
            start = clock(self.device)
            for _ in range(iters):
                self.step()
            return (clock(self.device) - start) / iters
        finally:
            self.optimizer = None
            free_gradients(self.core)
            gc.collect()


class RepeatBatch(IterableDataset):
    """The same batch forever (an in-memory dataloader: no decoding, no copies)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


class StepTimer(Callback):
    """Clock marks at the end of optimiser steps `warmup` and `warmup + iters`; drops the optimiser state at the end
    (so Lightning's teardown has nothing to copy to the host)."""

    def __init__(self, warmup: int, iters: int, device: torch.device) -> None:
        self.marks_at, self.device, self.marks = (warmup, warmup + iters), device, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.marks_at:
            self.marks.append(clock(self.device))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()


class LightningRun:
    """Ours: `L.Trainer(max_steps=...)` fitting GeometryEstimator on the fixed batch; logger, checkpoints, progress
    bar and model summary off; time per step between the marks of `StepTimer` (whole loop iterations)."""

    def __init__(
        self,
        module: GeometryEstimator,
        batch: dict[str, Any],
        device: torch.device,
        precision: str,
        grad_clip: float = 0.0,
    ) -> None:
        self.module, self.batch, self.device, self.precision, self.grad_clip = (
            module,
            batch,
            device,
            precision,
            grad_clip,
        )

    def run(self, warmup: int, iters: int) -> float:
        with quiet_lightning():
            return self._run(warmup, iters)

    def _run(self, warmup: int, iters: int) -> float:
        timer = StepTimer(warmup, iters, self.device)
        trainer = L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1, precision=self.precision,
            max_steps=warmup + iters, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
            gradient_clip_val=self.grad_clip or None,
        )  # fmt: skip
        loader = DataLoader(RepeatBatch(self.batch), batch_size=None, num_workers=0)
        try:
            trainer.fit(self.module, train_dataloaders=loader)
        finally:
            self.module.trainer = None
            del trainer
            self.module.to(self.device)  # Lightning's teardown moved it to the CPU
            free_gradients(self.module.core)
            gc.collect()
        return (timer.marks[1] - timer.marks[0]) / iters
