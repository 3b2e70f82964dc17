"""`make demo` end to end (slow: 6-9 min on a 2-core CPU with the stand-in cached, longer when it builds it).

Runs `python -m experiments.demo` as `make demo` does, in a temporary working directory (its `runs/` lands there;
the stand-in and the synthetic shards use the normal cache, so a second run reuses them), and checks what it
writes and reports: the before/after table, TensorBoard logs that hold the same numbers, the checkpoint.
"""

from __future__ import annotations

import math
import re

import pytest

from experiments.compare import final_metrics
from experiments.demo import REPORTED
from tests.helpers import ROOT, logged_scalars, run_python_module

ROW = re.compile(rf"^({'|'.join(REPORTED)})\s+(\S+)\s+(\S+)$", re.MULTILINE)


@pytest.mark.slow
def test_make_demo_trains_and_improves_every_reported_metric(tmp_path):
    output = run_python_module(
        "experiments.demo", ["--config", str(ROOT / "configs/demo.yaml")], tmp_path, timeout=2400
    )

    finished = re.search(r"Demo finished in [\d.]+ min \((\d+) optimiser steps\)\.", output)
    assert finished and int(finished.group(1)) == 1500, output[-3000:]
    table = {name: (float(before), float(after)) for name, before, after in ROW.findall(output)}
    assert set(table) == {"abs_rel", "delta1", "rmse", "silog"}, output[-3000:]  # a depth model
    assert all(math.isfinite(v) for pair in table.values() for v in pair)

    # Fine-tuning improved every metric clearly (README, 2026-12-01: AbsRel 0.361 -> 0.225, delta1 0.446 -> 0.688,
    # RMSE 1.348 -> 0.942; a constant prediction scores AbsRel 0.489).
    (abs_rel_0, abs_rel_1), (delta1_0, delta1_1) = table["abs_rel"], table["delta1"]
    assert abs_rel_1 < 0.8 * abs_rel_0 and abs_rel_1 < 0.30, table
    assert delta1_1 > delta1_0 + 0.1 and delta1_1 > 0.55, table
    assert table["rmse"][1] < 0.85 * table["rmse"][0], table
    assert table["silog"][1] < table["silog"][0], table

    # What it wrote: logs of the three runs under ./runs/demo_e2e, the last checkpoint of the fit.
    runs = tmp_path / "runs" / "demo_e2e"
    printed = re.search(r"^Checkpoint: (.+)$", output, re.MULTILINE)
    assert printed, output[-3000:]
    checkpoint = (tmp_path / printed.group(1)).resolve()  # relative to the working directory, or absolute
    assert checkpoint == (runs / "fit" / "checkpoints" / "last.ckpt").resolve()
    assert checkpoint.stat().st_size > 1_000_000
    assert "max_steps: 1500" in (runs / "fit" / "config.yaml").read_text()
    logged = {version: final_metrics(runs / version)[1] for version in ("before", "fit", "after")}
    for version, column in (("before", 0), ("after", 1)):
        assert logged[version]["val/images"] == 32, version  # every held-out room, once
        for name, values in table.items():  # the printed table is what TensorBoard holds
            assert logged[version][f"val/{name}"] == pytest.approx(values[column], abs=1e-4), (version, name)
    # The fit validated every 500 steps, the last time with the weights of last.ckpt: the same numbers as `after`.
    assert len(logged_scalars(runs / "fit", "val/abs_rel")) == 3
    assert logged["fit"]["val/abs_rel"] == pytest.approx(logged["after"]["val/abs_rel"], rel=1e-5)
    # The training loss came down: the mean of the last tenth of the logged losses against the first tenth's.
    loss = [value for _, value in logged_scalars(runs / "fit", "train/loss")]
    tenth = len(loss) // 10
    assert tenth >= 10 and sum(loss[-tenth:]) < 0.8 * sum(loss[:tenth])
