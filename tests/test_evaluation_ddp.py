"""`python -m experiments test` with an eval config: two DDP processes count every image once and read every shard
once (slow: subprocesses)."""

from __future__ import annotations

import csv
import json

import pytest

from datamodules.shard_writer import ShardWriter
from tests.helpers import ROOT, depth_sample, run_experiments_cli


@pytest.mark.slow
def test_eval_config_under_ddp_matches_one_device(tmp_path):
    with ShardWriter(tmp_path / "shards" / "nyuv2", "test", 2) as writer:
        for index in range(5):  # 5 images on 2 ranks: one padded slot
            writer.write(depth_sample(index, 16, 24)[0])
    base = [
        "test", "--config", str(ROOT / "configs/model/e2e_depth_tiny.yaml"),
        "--config", str(ROOT / "configs/eval/nyuv2.yaml"),
        f"--data.init_args.shard_root={tmp_path / 'shards'}", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    run_experiments_cli([*base, "--trainer.devices=1", "--trainer.logger.init_args.version=one"], tmp_path)
    log = tmp_path / "shards.jsonl"
    output = run_experiments_cli([*base, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger.init_args.version=two"],
                     tmp_path, env={"DGFT_SHARD_LOG": str(log)})  # fmt: skip
    assert "MEMBER: 2/2" in output  # two processes really ran
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(r["rank"], r["world_size"], r["split_by"]) for r in records} == {(0, 2, "shard"), (1, 2, "shard")}
    read = sorted(shard.rsplit("/", 1)[-1] for r in records for shard in r["shards"])
    assert read == [f"test-{i:06d}.tar" for i in range(3)]  # each shard read once, by one rank
    rows = {}
    for version in ("one", "two"):
        folder = tmp_path / "runs" / "eval" / "nyuv2" / version
        rows[version] = next(csv.DictReader((folder / "metrics_nyuv2.csv").open()))
        assert (folder / "metrics_nyuv2.md").is_file()
    assert rows["one"]["images"] == rows["two"]["images"] == "5"
    for name, value in rows["one"].items():
        if name not in ("dataset", "images"):  # batches differ (2+2+1 vs 2+1 per rank): float round-off only
            assert float(rows["two"][name]) == pytest.approx(float(value), rel=1e-5), name
