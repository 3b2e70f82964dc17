"""Shared fixtures: the CLI's base arguments for a tiny run that logs into a temporary folder."""

from __future__ import annotations

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
