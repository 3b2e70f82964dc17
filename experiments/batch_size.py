"""Derive gradient accumulation from the effective batch size, the micro-batch and the world size, docs/method.md §3."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def derive_accumulation(effective_batch_size: int, micro_batch_size: int, devices: int, num_nodes: int = 1) -> int:
    """accumulate = effective / (micro x devices x nodes); raise unless it is a positive integer."""
    per_step = micro_batch_size * devices * num_nodes
    if min(effective_batch_size, micro_batch_size, devices, num_nodes) < 1:
        raise ValueError("effective batch size, micro-batch size, devices and nodes must all be >= 1")
    accumulate, remainder = divmod(effective_batch_size, per_step)
    if remainder or accumulate < 1:
        raise ValueError(
            f"effective_batch_size={effective_batch_size} is not a multiple of micro-batch {micro_batch_size} x "
            f"{devices} devices x {num_nodes} nodes = {per_step}; change one of them"
        )
    return accumulate


class EffectiveBatchSize(Callback):
    """Sets `trainer.accumulate_grad_batches` so that every optimiser step sees `effective_batch_size` samples.

    Args:
        effective_batch_size: samples per optimiser step over all devices; None keeps the trainer's setting.
    """

    def __init__(self, effective_batch_size: int | None = None) -> None:
        self.effective_batch_size = effective_batch_size

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.effective_batch_size is None:
            return
        micro = getattr(trainer.datamodule, "batch_size", None)
        if not isinstance(micro, int):
            raise ValueError("effective_batch_size needs a datamodule with an integer `batch_size` (the micro-batch)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "set either batch.effective_batch_size or trainer.accumulate_grad_batches, not both "
                f"(got accumulate_grad_batches={trainer.accumulate_grad_batches})"
            )
        accumulate = derive_accumulation(self.effective_batch_size, micro, trainer.num_devices, trainer.num_nodes)
        trainer.accumulate_grad_batches = accumulate
        rank_zero_info(
            f"Effective batch {self.effective_batch_size} = micro-batch {micro} x {trainer.num_devices} devices x "
            f"{trainer.num_nodes} nodes x accumulation {accumulate}"
        )
