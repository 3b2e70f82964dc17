"""The scheduler-finding benchmark on a one-step checkpoint of the tiny model: counts, files, spacing matters."""

from __future__ import annotations

import csv

import pytest

from experiments.__main__ import main as cli_main
from experiments.benchmark_inference import main as benchmark
from experiments.benchmark_inference import validation_images
from tests.helpers import ROOT, tiny_run_args


def test_benchmark_counts_unet_calls_and_writes_the_table(tmp_path, shard_cache):
    fit = cli_main(["fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache), "--trainer.fast_dev_run=true"])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    configs = ["--config", str(ROOT / "configs/model/e2e_depth_tiny.yaml")]
    configs += ["--config", str(ROOT / "tests/configs/tiny_data.yaml")]
    rows = benchmark([
        "--ckpt_path", checkpoint, *configs, f"--data.init_args.synthetic.cache_dir={shard_cache}",
        "--images", "3", "--steps", "1", "4", "--ensembles", "1", "3", "--out", str(tmp_path / "table"),
    ])  # fmt: skip

    assert [(r["spacing"], r["steps"], r["ensemble"]) for r in rows] == [
        (s, n, k) for s in ("leading", "trailing") for n in (1, 4) for k in (1, 3)
    ]
    assert all(r["unet_calls"] == r["steps"] * r["ensemble"] and r["ms_per_image"] > 0 for r in rows)
    data = validation_images(configs[1::2], [f"--data.init_args.synthetic.cache_dir={shard_cache}"], 3)
    assert data["rgb"].min() >= 0 and data["rgb"].max() <= 1  # predict's input range, not the batch's [-1, 1]
    by_setting = {(r["spacing"], r["steps"], r["ensemble"]): r for r in rows}
    # One leading step evaluates the UNet at t=1, one trailing step at t=999: different predictions.
    assert by_setting["leading", 1, 1]["abs_rel"] != pytest.approx(by_setting["trailing", 1, 1]["abs_rel"], rel=1e-6)

    with open(tmp_path / "table.csv") as handle:
        written = list(csv.DictReader(handle))
    assert [float(r["abs_rel"]) for r in written] == pytest.approx([r["abs_rel"] for r in rows])
    assert (tmp_path / "table.md").read_text().count("\n") == len(rows) + 2


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark(["--ckpt_path", str(tmp_path / "none.ckpt")])
    assert "make demo" in capsys.readouterr().err
