"""DDP on two CPU processes (gloo), as a CLI subprocess killed hard on timeout (docs/dependencies.md: pytest + DDP)."""

from __future__ import annotations

import json
import math

import pytest

from experiments.compare import final_metrics, find_runs
from tests.helpers import run_experiments_cli, tiny_run_args


@pytest.mark.slow
def test_ddp_two_processes_read_different_shards(tmp_path):
    log, steps = tmp_path / "shards.jsonl", tmp_path / "steps.jsonl"
    record_steps = json.dumps({"class_path": "tests.helpers.RecordSteps", "init_args": {"path": str(steps)}})
    output = run_experiments_cli([
        "fit", *tiny_run_args(tmp_path),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--batch.effective_batch_size=8",
        "--data.init_args.num_workers=1", f"--trainer.callbacks+={record_steps}",
    ], tmp_path, env={"DGFT_SHARD_LOG": str(log)})  # fmt: skip
    assert "micro-batch 2 x 2 devices x 1 nodes x accumulation 2" in output
    # What the run did: each rank stepped the optimiser 3 times on 2 micro-batches of 2 (4 samples), so every
    # optimiser step saw 4 + 4 = 8 samples, the effective batch.
    per_step = [json.loads(line) for line in steps.read_text().splitlines()]
    assert sorted((r["rank"], r["step"], r["samples"]) for r in per_step) == [
        (rank, step, 4) for rank in (0, 1) for step in (0, 1, 2)
    ]
    # Validation ran under DDP and counted every validation room exactly once (tiny data: 4 rooms).
    (run,) = find_runs([tmp_path / "runs"])
    _, values = final_metrics(run)
    assert values["val/images"] == 4 and math.isfinite(values["val/abs_rel"])

    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    by_rank = {rank: {s for r in train if r["rank"] == rank for s in r["shards"]} for rank in (0, 1)}
    assert {r["world_size"] for r in train} == {2}
    assert by_rank[0] and by_rank[1] and not (by_rank[0] & by_rank[1])
