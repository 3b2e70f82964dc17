"""Plain helpers shared by the tests: paths, CLI arguments for tiny runs, fake batches and samples, shard files.

Fixtures live in conftest.py (they may call these); tests import from here, never from conftest or another test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from datamodules.shard_format import decode_sample, encode_sample

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ CLI runs
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


def tiny_overrides(tmp: Path) -> list[str]:
    """Swap a paper config's real checkpoint and shards for the tiny model and data, and the GPU for the CPU."""
    return [
        "--config", str(ROOT / "tests/configs/tiny_data.yaml"),
        "--model.init_args.pretrained=null", "--model.init_args.tiny.seed=0",
        f"--data.init_args.synthetic.cache_dir={tmp / 'cache'}", f"--data.init_args.shard_root={tmp}",
        "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
    ]  # fmt: skip


def run_python_module(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> str:
    """`python -m MODULE ARGS` in a subprocess; its output (stdout and stderr), or fail the test with it.

    The process gets its own session so that a hung DDP run, which ignores SIGTERM, is killed with its workers.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"python -m {module} hung after {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def run_experiments_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """`python -m experiments ARGS` in a subprocess (DDP runs there, docs/dependencies.md); its output, or fail."""
    return run_python_module("experiments", args, cwd, env, timeout)


class RecordSteps(Callback):
    """Records, for this process, the training samples each optimiser step consumed (all its accumulated
    micro-batches) and the optimiser step after which each validation ran.

    Add it with `--trainer.callbacks+=tests.helpers.RecordSteps`; with `path`, every optimiser step also appends a
    JSON line {"rank", "step", "samples"} there (for subprocess and DDP runs).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.samples: list[int] = []
        self.validated_at: list[int] = []
        self.pending = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.pending += len(batch["rgb"])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self.samples.append(self.pending)
        if self.path is not None:
            record = {"rank": trainer.global_rank, "step": trainer.global_step, "samples": self.pending}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.pending = 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at.append(trainer.global_step)


def logged_scalars(run: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point of TensorBoard scalar `tag` in the run folder `run`, by step; [] if not logged."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0 = keep every point
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in sorted(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))]


# ------------------------------------------------------------------------------------ batches, samples
def fake_batch(b: int = 2, h: int = 32, w: int = 48) -> dict:
    """A training batch as the datamodule yields it (seeded): depth in [1, 6] m, an invalid 8x8 corner."""
    torch.manual_seed(1)
    depth = torch.rand(b, 1, h, w) * 5 + 1
    mask = torch.ones(b, 1, h, w, dtype=torch.bool)
    mask[:, :, :8, :8] = False
    return {
        "rgb": torch.rand(b, 3, h, w) * 2 - 1,
        "depth": depth.where(mask, torch.zeros_like(depth)),
        "depth_target": depth,
        "depth_norm": (depth - 3.5) / 2.5,
        "normals": torch.zeros(b, 3, h, w),
        "mask": mask,
        "key": [f"k{i}" for i in range(b)],
        "source": ["synthetic"] * b,
    }


def depth_sample(index: int, height: int = 20, width: int = 28) -> tuple[dict, np.ndarray]:
    """RGB grey level k encodes depth 1 + 0.01 k m exactly (mm units): mean RGB is affine in depth."""
    rng = np.random.default_rng(index)
    level = rng.integers(0, 256, (height, width))
    depth = (1000 + 10 * level) / 1000.0
    mask = np.ones((height, width), bool)
    mask[: 2 + index, :3] = False  # a different valid count per image
    rgb = np.repeat(level[..., None], 3, axis=-1).astype(np.uint8)
    sample = encode_sample(f"d{index}", rgb, depth.astype(np.float32), mask, meta={"source": "t"})
    return sample, np.where(mask, depth, 0)


# ------------------------------------------------------------------------------- converter files, shards
def read_samples(folder: Path, pattern: str = "*.tar") -> dict[str, dict[str, Any]]:
    """Every sample of the shards in `folder`, decoded, by key."""
    samples = {}
    for path in sorted(folder.glob(pattern)):
        raw: dict[str, dict[str, Any]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                raw.setdefault(key, {"__key__": key, "__url__": str(path)})[name] = tar.extractfile(member).read()
        samples.update({key: decode_sample(r) for key, r in raw.items()})
    return samples


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write uint8 (gray or RGB) or uint16 (gray) PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_jpg(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB JPEG (quality 95), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)
    return path


def corrupt(path: Path) -> Path:
    """Write bytes that no image/HDF5/npy reader accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a valid file" * 3)
    return path


# ------------------------------------------------------------------------------------------ export
def export_model(model: Any, out_dir: Path, **options: Any) -> Path:
    """`export_to_diffusers` for a GeometryEstimator: its core and task, text encoder from its own source."""
    from lightning_modules.export import export_to_diffusers

    options.setdefault("tokenizer_source", model.hparams.get("pretrained"))
    options.setdefault("tiny", model.hparams.get("tiny"))
    return export_to_diffusers(model.core, model.task, out_dir, **options)
