"""Fault injection, converters: no inputs, a missing folder, Ctrl-C in the middle of a conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.convert import DATASETS
from datamodules.convert.__main__ import main
from tests.helpers import read_samples, save_png


def nyu_raw(src: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        save_png(src / f"test/room_{i:04d}/rgb_0001.png", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        save_png(src / f"test/room_{i:04d}/depth_0001.png", np.full((480, 640), 2000 + i, dtype=np.uint16))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_no_inputs_prints_the_expected_layout(tmp_path, capsys, name):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main([name, "--src", str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}: no inputs found under") and "expected under --src:" in err
    assert DATASETS[name].layout and DATASETS[name].layout in err
    assert not out.exists()  # nothing written that a later run would trip over
    assert main([name, "--src", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_ctrl_c_ends_cleanly_and_a_rerun_completes(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "nyuv2", tmp_path / "out"
    nyu_raw(src, 5)
    dataset = DATASETS["nyuv2"]
    calls = {"n": 0}

    def interrupted(item, options):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the second shard
            raise KeyboardInterrupt
        return original(item, options)

    original = dataset.convert
    monkeypatch.setitem(DATASETS, "nyuv2", type(dataset)(**{**dataset.__dict__, "convert": interrupted}))
    args = ["nyuv2", "--src", str(src), "--out", str(out), "--shard-size", "2", "--quiet"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 complete shards" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar"]  # no partial shard under a final name

    monkeypatch.setitem(DATASETS, "nyuv2", dataset)
    assert main(args) == 0
    resumed = read_samples(out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
    assert not list(out.glob("*.tmp"))
    assert main(["nyuv2", "--src", str(src), "--out", str(tmp_path / "fresh"), "--shard-size", "2", "--quiet"]) == 0
    fresh = read_samples(tmp_path / "fresh")
    assert resumed.keys() == fresh.keys() and len(fresh) == 5
    for key in fresh:
        np.testing.assert_array_equal(resumed[key]["depth"], fresh[key]["depth"])
