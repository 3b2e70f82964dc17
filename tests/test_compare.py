"""`python -m experiments.compare`: final validation metrics of several TensorBoard runs as one table."""

from __future__ import annotations

import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from experiments.compare import find_runs, main


def write_run(folder, points: dict[str, list[tuple[int, float]]]) -> None:
    """One event file in `folder` with the given (step, value) points per tag."""
    writer = SummaryWriter(str(folder))
    for tag, series in points.items():
        for step, value in series:
            writer.add_scalar(tag, value, step)
    writer.close()
    time.sleep(0.01)  # distinct wall times and event file names


def table(capsys) -> dict[str, list[str]]:
    lines = capsys.readouterr().out.strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[1][0].startswith("---")
    return {row[0]: row[1:] for row in [cells[0], *cells[2:]]}


def test_runs_side_by_side(tmp_path, capsys):
    root = tmp_path / "paper_depth"
    write_run(root / "e2e_ft_marigold/job_1", {"val/abs_rel": [(10, 0.2), (20, 0.052)], "val/delta1": [(20, 0.966)],
                                               "train/loss": [(20, 0.1)]})  # fmt: skip
    # A requeued run: a second event file in the same folder logs step 20 again; the later write counts.
    sd2 = root / "e2e_ft_sd2/job_2"
    write_run(sd2, {"val/abs_rel": [(10, 0.3), (20, 0.9)], "val/delta1": [(20, 0.5)]})
    write_run(sd2, {"val/abs_rel": [(20, 0.054)], "val/delta1": [(20, 0.965)]})
    write_run(root / "diffusion_sd2/job_3", {"train/loss": [(5, 1.0)]})  # not validated yet

    assert main([str(root)]) == 0
    rows = table(capsys)
    assert rows["run"] == ["step", "val/abs_rel", "val/delta1"]
    assert rows["e2e_ft_marigold/job_1"] == ["20", "0.052", "0.966"]
    assert rows["e2e_ft_sd2/job_2"] == ["20", "0.054", "0.965"]
    assert rows["diffusion_sd2/job_3"] == ["-", "-", "-"]

    assert main([str(root / "e2e_ft_sd2"), str(root / "e2e_ft_marigold"), "--metrics", "delta1"]) == 0
    assert table(capsys) == {"run": ["step", "val/delta1"], "e2e_ft_marigold/job_1": ["20", "0.966"],
                             "e2e_ft_sd2/job_2": ["20", "0.965"]}  # fmt: skip


def test_nothing_to_compare_is_reported(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err
    write_run(tmp_path / "run", {"train/loss": [(1, 1.0)]})
    assert main([str(tmp_path)]) == 1 and "no 'val/*' metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert find_runs([tmp_path]) == [tmp_path / "run"]
