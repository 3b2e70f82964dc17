"""The mini-paper command end to end on its tiny setting (`--quick`): stages, export, table, reuse."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import mini_paper
from experiments.compare import find_runs


@pytest.mark.slow
def test_mini_paper_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DGFT_CACHE", str(tmp_path / "cache"))
    args = ["--quick", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--no-readme",
            "--images", "4", "--repeats", "1"]  # fmt: skip
    rows = mini_paper.main(args)
    assert [(r["model"], r["steps"], r["ensemble"]) for r in rows] == [
        (row.model, row.steps, row.ensemble) for row in mini_paper.ROWS
    ]
    for row in rows:
        assert row["unet_calls"] == row["steps"] * row["ensemble"]
        for key in ("synthetic_abs_rel", "middlebury_abs_rel"):
            assert 0 < row[key] < 10, (row["model"], key)
    with open(tmp_path / "results" / "mini_paper.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    meta = json.loads((tmp_path / "results" / "mini_paper.json").read_text())
    assert meta["seed"] == 2024 and meta["machine"]["cpus"] >= 1 and meta["wall_seconds"] > 0
    assert "Middlebury AbsRel" in (tmp_path / "results" / "mini_paper.md").read_text()
    # One TensorBoard root: the three training runs are found by compare (and overlaid by tensorboard).
    names = {run.parent.name for run in find_runs([tmp_path / "runs"])}
    assert {"marigold_diffusion", "e2e_from_marigold", "e2e_from_sd2"} <= names
    # The diffusion-trained model is a stock Marigold depth folder.
    from diffusers import MarigoldDepthPipeline

    exported = MarigoldDepthPipeline.from_pretrained(tmp_path / "runs" / "marigold_diffusion" / "exported")
    assert exported.unet.config.in_channels == 8
    # A second call reuses every finished stage.
    capsys.readouterr()
    mini_paper.main(args)
    out = capsys.readouterr().out
    assert out.count("reusing") == 3 and "training" not in out


def test_readme_table_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{mini_paper.README_START}\nold\n{mini_paper.README_END}\noutro\n")
    assert mini_paper.update_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{mini_paper.README_START}\n| new |\n{mini_paper.README_END}\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not mini_paper.update_readme(plain, "| new |") and plain.read_text() == "no markers\n"
