"""The benchmark harness (issue 11): every mode runs with tiny settings and writes the documented JSON and Markdown.

Sanity checks only (positive times, consistent ratios, counts); no timing assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments.benchmark.__main__ import build_parser, main
from experiments.benchmark.models import build_components
from experiments.benchmark.report import JSON_KEYS
from experiments.benchmark.train import IMPLS
from lightning_modules.components import ensure_eight_channel_unet
from tests.helpers import ROOT

TINY = ["--device", "cpu", "--threads", "1", "--warmup", "1", "--iters", "1", "--repeats", "1"]
GPU_SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def run_mode(tmp_path: Path, mode: str, *args: str) -> dict[str, Any]:
    """`main([...])` in this process (torch threads restored); the JSON it wrote, checked for the common fields."""
    threads = torch.get_num_threads()
    out = tmp_path / mode
    try:
        returned = main(["--mode", mode, *TINY, "--out", str(out), *args])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(JSON_KEYS) <= set(doc) and doc["mode"] == mode and doc["results"] == returned["results"]
    machine, versions = doc["machine"], doc["versions"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch_threads"] == 1 and machine["gpu"] is None
    assert machine["ram_gb"] > 0 and len(machine["load_average"]) == 3 and len(doc["load_average_end"]) == 3
    assert all(versions[name] for name in ("python", "torch", "diffusers", "lightning"))
    assert doc["command"].startswith(f"python -m experiments.benchmark --mode {mode}")
    assert doc["settings"]["seed"] == 0 and doc["settings"]["repeats"] == 1
    assert out.with_suffix(".md").read_text().startswith("| ")
    return doc


def check_stats(stats: dict[str, float]) -> None:
    assert stats["n"] == 1 and 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["spread"] >= 0


def test_train_runs_every_configuration_and_implementation(tmp_path: Path) -> None:
    doc = run_mode(tmp_path, "train", "--height", "32", "--width", "32", "--no_memory")
    rows = doc["results"]
    expected = set(itertools.product(["e2e", "diffusion"], [False, True], ["32-true", "bf16-mixed"]))
    assert {(r["objective"], r["checkpointing"], r["precision"]) for r in rows} == expected and len(rows) == 8
    for row in rows:
        assert set(row["impls"]) == set(IMPLS)
        ms = {impl: entry["ms_per_step"]["median"] for impl, entry in row["impls"].items()}
        for impl, entry in row["impls"].items():
            check_stats(entry["ms_per_step"])
            assert entry["samples_per_s"] == pytest.approx(2 / (ms[impl] / 1000))
            assert "peak_mb" not in entry  # --no_memory, and no CUDA
        assert row["time_vs_bare"] == pytest.approx(ms["lightning"] / ms["bare"])
        assert row["speedup_vs_reference"] == pytest.approx(ms["reference"] / ms["lightning"])


def test_train_speed_switches_are_configurations(tmp_path: Path) -> None:
    doc = run_mode(
        tmp_path, "train", "--height", "32", "--width", "32", "--no_memory", "--objectives", "e2e", "--checkpointing",
        "off", "--precisions", "32-true", "--channels_last", "off", "on", "--optimizer_impl", "for_loop",
        "--contiguous_group_norm", "off", "on",
    )  # fmt: skip
    switches = [(row["channels_last"], row["contiguous_group_norm"]) for row in doc["results"]]
    assert switches == [(False, False), (False, True), (True, False), (True, True)]
    assert doc["settings"]["optimizer_impl"] == "for_loop" and doc["settings"]["channels_last"] == [False, True]
    assert all(set(row["impls"]) == set(IMPLS) for row in doc["results"])


def test_train_peak_memory_is_measured_per_fresh_process(tmp_path: Path) -> None:
    doc = run_mode(
        tmp_path, "train", "--height", "32", "--width", "32", "--objectives", "diffusion", "--checkpointing", "on",
        "--precisions", "bf16-mixed", "--batch", "1",
    )  # fmt: skip
    (row,) = doc["results"]
    for entry in row["impls"].values():
        assert entry["peak_kind"] == "rss_vmhwm_fresh_process"
        assert 50 < entry["model_mb"] <= entry["peak_mb"] < 16_000
        assert entry["samples_per_s"] == pytest.approx(1000 / entry["ms_per_step"]["median"])


def test_predict_latency_floor_infer_and_plots(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    doc = run_mode(
        tmp_path, "predict", "--height", "32", "--width", "48", "--steps", "2", "--members", "2", "--images", "2",
        "--plots", "--plot_dir", str(plots), "--sweep_sizes", "32", "64", "--sweep_members", "1", "2",
    )  # fmt: skip
    results = doc["results"]
    single, multi = results["rows"]
    assert (single["steps"], single["members"], single["unet_calls"]) == (1, 1, 1)
    assert (multi["steps"], multi["members"], multi["unet_calls"]) == (2, 2, 4)
    assert single["ensemble_ms"] is None and 0 < multi["ensemble_ms"]["median"] < multi["ours_ms"]["median"]
    for row in results["rows"] + results["sweep_size"] + results["sweep_members"]:
        for key in ("ours_ms", "floor_ms", "floor_alone_ms"):
            check_stats(row[key])
        assert row["ours_vs_floor"] == pytest.approx(row["ours_ms"]["median"] / row["floor_ms"]["median"])
    assert [(r["long_edge"], r["height"], r["width"]) for r in results["sweep_size"]] == [(32, 24, 32), (64, 48, 64)]
    assert [r["members"] for r in results["sweep_members"]] == [1, 2]
    (infer,) = results["infer"]
    assert infer["images"] == 2 and infer["images_per_s"] > 0 and infer["floor_images_per_s"] > 0
    assert infer["vs_floor"] == pytest.approx(infer["images_per_s"] / infer["floor_images_per_s"])
    assert infer["model_load_s"] is None or infer["images_per_s_without_load"] >= infer["images_per_s"]
    for name in ("benchmark_predict_size.png", "benchmark_predict_ensemble.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_as_the_gpu_script_calls_it(tmp_path: Path) -> None:
    doc = run_mode(
        tmp_path, "predict", "--height", "32", "--width", "32", "--precisions", "32-true", "bf16-mixed",
        "--steps", "0", "--images", "0",
    )  # fmt: skip
    rows = doc["results"]["rows"]
    assert [(r["precision"], r["steps"], r["members"]) for r in rows] == [("32-true", 1, 1), ("bf16-mixed", 1, 1)]
    assert doc["results"]["infer"] == [] and doc["results"]["sweep_size"] == []


def test_data_samples_per_worker(tmp_path: Path) -> None:
    doc = run_mode(
        tmp_path, "data", "--resolutions", "32x32", "480x640", "--workers", "0", "1", "--samples", "4",
        "--shuffle_buffer", "2", "--iters", "2", "--normals", "off", "on",
    )  # fmt: skip
    rows = doc["results"]
    assert [(r["height"], r["width"], r["decode_normals"], r["workers"]) for r in rows] == [
        (h, w, normals, workers) for h, w in [(32, 32), (480, 640)] for normals in (False, True) for workers in (0, 1)
    ]
    for row in rows:
        check_stats(row["samples_per_s"])
        assert row["samples_per_s_per_worker"]["median"] == pytest.approx(row["samples_per_s"]["median"])
        per_worker = row["samples_per_s_per_worker"]["median"]
        assert row["meets_target"] == (per_worker >= 30 if row["height"] == 480 else None)


def test_sd2_architecture_is_sd2_size() -> None:
    with torch.device("meta"):  # no memory, no time
        parts = build_components("sd2")
        ensure_eight_channel_unet(parts.unet, "e2e_ft")
    unet = parts.unet
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724 + 4 * 320 * 9  # SD2's UNet, conv_in widened
    assert sum(p.numel() for p in parts.vae.parameters()) == 83_653_863
    assert unet.config.in_channels == 8 and unet.config.cross_attention_dim == 1024
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280] and unet.config.use_linear_projection
    assert parts.vae.config.scaling_factor == 0.18215 and parts.text_encoder.config.hidden_size == 1024


def gpu_script_commands(tmp_path: Path, **env: str) -> list[list[str]]:
    """The command lines benchmarks/gpu.sh runs, recorded by a stand-in for python (nothing is executed)."""
    log = tmp_path / "commands.jsonl"
    stub = tmp_path / "python"
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    stub.chmod(0o755)
    subprocess.run(["bash", str(GPU_SCRIPT)], env={**os.environ, "PYTHON": str(stub), **env}, check=True,
                   capture_output=True)  # fmt: skip
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_gpu_script_runs_the_documented_measurements(tmp_path: Path) -> None:
    commands = [c[2:] for c in gpu_script_commands(tmp_path) if c[:2] == ["-m", "experiments.benchmark"]]
    parser = build_parser()
    parsed = [parser.parse_args(argv) for argv in commands]
    assert all(args.device == "cuda" for args in parsed)
    by_out = {args.out.name: args for args in parsed}
    assert set(by_out) == {"gpu_sd2_train", "gpu_sd2_predict", "gpu_tiny_train", "gpu_tiny_predict", "gpu_data"}
    train = by_out["gpu_sd2_train"]
    assert (train.arch, train.objectives, train.precisions, train.checkpointing) == (
        "sd2",
        ["e2e"],
        ["bf16-mixed"],
        [False, True],
    )
    assert (train.batch, train.height, train.width) == (2, 480, 640)
    assert train.channels_last == [False, True] and train.contiguous_group_norm == [True]
    predict = by_out["gpu_sd2_predict"]
    assert (predict.arch, predict.height, predict.width, predict.steps) == ("sd2", 576, 768, 0)
    assert by_out["gpu_tiny_train"].arch == by_out["gpu_tiny_predict"].arch == "tiny"


@pytest.mark.slow
def test_gpu_script_smoke_run_on_cpu(tmp_path: Path) -> None:
    """The whole script on the CPU with tiny sizes (SD2 swapped for the tiny model: SD2 training needs ~15 GB)."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SMOKE": "1", "SD2_ARCH": "tiny",
           "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", str(GPU_SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("== summary")[-1]
    assert "train tiny e2e ckpt off bf16-mixed 32x32 batch 2" in summary and "infer tiny 2 PNGs" in summary
    for name in ("gpu_sd2_train", "gpu_sd2_predict", "gpu_tiny_train", "gpu_tiny_predict", "gpu_data"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["machine"]["gpu"] is None
