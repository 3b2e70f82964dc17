"""DDP on two CPU processes (gloo), run as a CLI subprocess with a hard kill (STACK.md: pytest + ddp orphans)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_run_args


@pytest.mark.slow
def test_ddp_two_processes_read_different_shards(tmp_path):
    log = tmp_path / "shards.jsonl"
    env = dict(os.environ, DGFT_SHARD_LOG=str(log), PYTHONPATH=str(ROOT))
    args = [
        sys.executable, "-m", "experiments", "fit", *tiny_run_args(tmp_path),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--batch.effective_batch_size=8",
        "--data.init_args.num_workers=1",
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hung DDP run ignores SIGTERM
        output, _ = proc.communicate()
        pytest.fail(f"DDP run hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert "micro-batch 2 x 2 devices x 1 nodes x accumulation 2" in output
    assert "val/abs_rel" in output or (tmp_path / "runs").exists()

    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    by_rank = {rank: {s for r in train if r["rank"] == rank for s in r["shards"]} for rank in (0, 1)}
    assert {r["world_size"] for r in train} == {2}
    assert by_rank[0] and by_rank[1] and not (by_rank[0] & by_rank[1])
