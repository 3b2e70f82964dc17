"""Gradient accumulation derived from the effective batch size and the world size (docs/method.md §3):
accumulation = effective / (micro-batch x devices x nodes), checked on hand-computed cases and on a real run."""

import pytest

from experiments.__main__ import main
from experiments.batch_size import derive_accumulation
from tests.helpers import RecordSteps, logged_scalars, tiny_run_args

# (effective, micro-batch per device, devices, nodes, accumulation), each worked out by hand
CASES = [
    (32, 2, 1, 1, 16),  # docs/method.md §3: 1 GPU -> 16
    (32, 2, 4, 1, 4),  # 4 GPUs -> 4
    (32, 2, 8, 1, 2),  # 8 GPUs -> 2 (configs/trainer/ddp.yaml)
    (32, 2, 2, 1, 8),
    (32, 2, 8, 2, 1),  # 16 GPUs on 2 nodes
    (32, 1, 8, 4, 1),  # slurm.yaml: 4 nodes x 8 GPUs need micro-batch 1
    (32, 1, 1, 1, 32),  # 24 GB cards: micro-batch 1 x accumulation 32
    (64, 4, 2, 2, 4),
    (12, 3, 1, 2, 2),
    (8, 2, 2, 1, 2),  # tests/test_ddp.py's two-process run
    (7, 7, 1, 1, 1),
]


@pytest.mark.parametrize("effective, micro, devices, nodes, expected", CASES)
def test_accumulation_keeps_effective_batch(effective, micro, devices, nodes, expected):
    assert derive_accumulation(effective, micro, devices, nodes) == expected


def test_non_integer_accumulation_fails_clearly():
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(32, 3, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(32, 2, 32)  # 64 samples per step already
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(32, 2, 8, 4)
    with pytest.raises(ValueError, match=">= 1"):
        derive_accumulation(32, 0, 1)
    with pytest.raises(ValueError, match=">= 1"):
        derive_accumulation(32, 2, 1, 0)


def test_a_run_steps_the_optimiser_once_per_effective_batch(tmp_path, shard_cache):
    """Effective 8 from micro-batch 2 on one CPU: 4 micro-batches (8 samples) per optimiser step, and the
    validation interval counts micro-batches (4 micro-batches = one optimiser step)."""
    cli = main([
        "fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache),
        "--trainer.callbacks+=tests.helpers.RecordSteps", "--batch.effective_batch_size=8",
        "--trainer.max_steps=3", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
    ])  # fmt: skip
    (record,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordSteps)]
    assert record.samples == [8, 8, 8] and record.pending == 0
    assert cli.trainer.global_step == 3 and cli.trainer.accumulate_grad_batches == 4
    # Validated after micro-batches 4, 8 and 12, i.e. after optimiser steps 1, 2 and 3 (the last one included),
    # and each validation's metric is in the TensorBoard log.
    assert record.validated_at == [1, 2, 3]
    assert len(logged_scalars(cli.trainer.logger.log_dir, "val/abs_rel")) == 3
