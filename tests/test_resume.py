"""Interrupted runs (SLURM's requeue signal, SIGTERM) resume to the weights of an uninterrupted run.

Weight equality needs data whose order cannot matter, because a resumed stream gets a new seed: one repeated scene,
no flips, the E2E objective with zero noise (no randomness in a step). The tolerance is exact equality
(`torch.equal`): same process, same CPU kernels, same sequence of operations. The last test shows on varied data
that the resumed stream reads a new order instead of replaying the first one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from experiments.__main__ import main
from tests.helpers import ROOT


class Interrupt(Callback):
    """Sends signals to this process once optimiser step `step` is done, as a scheduler would."""

    def __init__(self, step: int, signals: list[str]) -> None:
        self.step, self.signals, self.sent = step, signals, False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            for name in self.signals:
                signal.raise_signal(signal.Signals[name])  # handlers run before this returns


class RecordKeys(Callback):
    """Remembers (global step, sample keys) of every training micro-batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[str]]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.seen.append((trainer.global_step, list(batch["key"])))


def callbacks_config(tmp: Path, interrupt: tuple[int, list[str]] | None = None) -> Path:
    """A trainer config: checkpoints every 2 steps plus last, key recording, optionally an interruption."""
    lines = [
        "trainer:", "  callbacks:",
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint",
        "      init_args: {save_last: true, every_n_train_steps: 2}",
        f"    - class_path: {__name__}.RecordKeys",
    ]  # fmt: skip
    if interrupt is not None:
        step, signals = interrupt
        lines += [f"    - class_path: {__name__}.Interrupt", f"      init_args: {{step: {step}, signals: {signals}}}"]
    path = tmp / f"callbacks_{len(list(tmp.glob('callbacks_*.yaml')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_args(tmp: Path, cache: Path, version: str | None, callbacks: Path, steps: int, one_scene: bool) -> list[str]:
    """A tiny E2E run with accumulation 2, no validation, logging to runs/resume/<version> under `tmp`."""
    args = [
        "fit",
        "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        "--config", str(ROOT / "configs/model/e2e_depth_tiny.yaml"),
        "--config", str(ROOT / "tests/configs/tiny_data.yaml"),
        "--config", str(callbacks),
        f"--data.init_args.synthetic.cache_dir={cache}",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", "--trainer.logger.init_args.name=resume",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--batch.effective_batch_size=4",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    if version is not None:
        args.append(f"--trainer.logger.init_args.version={version}")
    if one_scene:  # every micro-batch is the same two copies of one scene: the order cannot matter
        args += ["--data.init_args.synthetic.num_train=1", "--data.init_args.synthetic.samples_per_shard=1",
                 "--data.init_args.hflip_prob=0"]  # fmt: skip
    return args


def recorded(cli) -> list[tuple[int, list[str]]]:
    """What RecordKeys saw (jsonargparse imports this module under its package name: match by class name)."""
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "RecordKeys").seen


def assert_same_weights(a: LightningModule, b: LightningModule) -> None:
    ours, theirs = a.core.unet.state_dict(), b.core.unet.state_dict()
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


pytestmark = pytest.mark.slow  # about 90 s for the three tests on 2 CPU cores


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 6-step run on one repeated scene."""
    tmp = tmp_path_factory.mktemp("reference")
    return main(fit_args(tmp, tmp / "cache", "reference", callbacks_config(tmp), 6, one_scene=True))


def test_slurm_requeue_resumes_from_the_hpc_checkpoint(tmp_path, monkeypatch, reference):
    bin_dir, requeued = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")  # a stand-in scontrol that records the requeue
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dgft", "SLURM_NTASKS": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"

    # SLURM's warning signal at step 3 (between the periodic checkpoints at 2 and 4), then its SIGTERM.
    interrupted = callbacks_config(tmp_path, (3, ["SIGUSR1", "SIGTERM"]))
    with pytest.raises(SIGTERMException):
        main(fit_args(tmp_path, cache, None, interrupted, 6, one_scene=True))
    run = tmp_path / "runs/resume/job_4242"  # named after the job id, which the requeued job keeps
    assert requeued.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["global_step"] == 3
    # Steps 4-6 still change the weights, so matching the reference below is not trivial.
    assert not torch.equal(hpc["state_dict"]["core.unet.conv_out.weight"], reference.model.core.unet.conv_out.weight)

    # The requeued job: same command, no ckpt_path; Lightning finds hpc_ckpt_1 in the run folder.
    resumed = main(fit_args(tmp_path, cache, None, callbacks_config(tmp_path), 6, one_scene=True))
    assert resumed.trainer.ckpt_path == str(run / "hpc_ckpt_1.ckpt")
    assert resumed.datamodule.stream_start_step == 3  # global step restored before train_dataloader()
    assert resumed.trainer.global_step == 6 and recorded(resumed)[0][0] == 3
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    assert_same_weights(resumed.model, reference.model)


def test_sigterm_then_auto_resume_from_the_last_checkpoint(tmp_path, reference):
    cache = tmp_path / "cache"
    with pytest.raises(SIGTERMException):  # Lightning stops at the end of the batch; no checkpoint is written
        main(fit_args(tmp_path, cache, "run1", callbacks_config(tmp_path, (3, ["SIGTERM"])), 6, one_scene=True))
    run = tmp_path / "runs/resume/run1"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 2

    args = fit_args(tmp_path, cache, "run1", callbacks_config(tmp_path), 6, one_scene=True)
    resumed = main([*args, "--ckpt_path=auto"])
    assert resumed.trainer.ckpt_path == str(run / "checkpoints/last.ckpt")
    assert resumed.datamodule.stream_start_step == 2 and resumed.trainer.global_step == 6
    assert_same_weights(resumed.model, reference.model)


def test_resumed_stream_reads_a_new_order(tmp_path):
    cache, callbacks = tmp_path / "cache", callbacks_config(tmp_path)
    whole = main(fit_args(tmp_path, cache, "whole", callbacks, 8, one_scene=False))
    first = main(fit_args(tmp_path, cache, "parts", callbacks, 4, one_scene=False))
    second = main([*fit_args(tmp_path, cache, "parts", callbacks, 8, one_scene=False), "--ckpt_path=auto"])
    assert second.datamodule.stream_start_step == 4 and second.trainer.global_step == 8

    def keys(cli) -> list[list[str]]:
        return [k for _, k in recorded(cli)]

    assert keys(first) == keys(whole)[:8]  # 4 steps x accumulation 2: the same seed gives the same order
    after = keys(second)
    assert len(after) == 8 and after != keys(whole)[8:]  # a new order after the resume ...
    assert after != keys(whole)[:8]  # ... that does not replay the start either
