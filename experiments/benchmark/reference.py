"""The reference-style baseline: how the reference trainer steps (fp32, eager, data prepared in the main process).

Every step decodes its samples one by one from shard bytes (`decode_sample`), builds the targets and the random flip
per sample on the CPU, stacks and moves them, then runs the same objective with AdamW: no dataloader workers, no
overlap of data and compute, no mixed precision.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import default_collate

from datamodules.shard_format import decode_sample
from datamodules.targets import build_targets, hflip
from experiments.benchmark.loops import StepRunner
from lightning_modules.core import GeometryCore
from lightning_modules.objectives import Objective
from lightning_modules.tasks import Task


class ReferenceStep(StepRunner):
    """One reference-style optimiser step per call, samples taken in turn from raw shard samples."""

    def __init__(
        self,
        core: GeometryCore,
        task: Task,
        objective: Objective,
        raw_samples: list[dict[str, Any]],
        batch: int,
        device: torch.device,
        grad_clip: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(core, task, objective, device, bf16=False, grad_clip=grad_clip, optimizer_impl=None)
        self.raw, self.batch_size, self.next = raw_samples, batch, 0
        self.rng = random.Random(seed)

    def prepare(self) -> dict[str, Any]:
        """The next micro-batch, decoded and preprocessed sample by sample in this process."""
        samples = []
        for _ in range(self.batch_size):
            decoded = decode_sample(self.raw[self.next % len(self.raw)], normals=self.task.needs_normals)
            sample = build_targets(decoded, with_normals=self.task.needs_normals)
            samples.append(hflip(sample) if self.rng.random() < 0.5 else sample)
            self.next += 1
        return move_data_to_device(default_collate(samples), self.device)

    def step(self) -> None:
        self.optimizer_step(self.prepare())
