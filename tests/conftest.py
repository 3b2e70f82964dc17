"""Shared fixtures: the CLI's base arguments for a tiny run that logs into a temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_args(tmp: Path, model: str = "e2e_depth_tiny", cache: Path | None = None) -> list[str]:
    """--config arguments for the tiny model on tiny synthetic data, logs and cache under `tmp`."""
    return [
        "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        "--config", str(ROOT / f"configs/model/{model}.yaml"),
        "--config", str(ROOT / "tests/configs/tiny_data.yaml"),
        f"--data.init_args.synthetic.cache_dir={cache or tmp / 'cache'}",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        # fast_dev_run drops the logger, so checkpoints would land in the working directory
        f"--trainer.default_root_dir={tmp}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> Path:
    """One synthetic cache for the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("synthetic_cache")


def run_experiments_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """`python -m experiments ARGS` in a subprocess (DDP runs there, docs/dependencies.md); its output, or fail with it.

    The process gets its own session so that a hung DDP run, which ignores SIGTERM, is killed with its workers.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"run hung after {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised model saved in Stable Diffusion 2 layout (4-channel UNet)."""
    from lightning_modules.standin_folder import save_tiny_sd2_folder

    return save_tiny_sd2_folder(tmp_path_factory.mktemp("tiny_sd2") / "sd2")
