"""Cluster presets: SLURM detection from its environment variables, ranks, derived accumulation, stable run folders."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from experiments.__main__ import main
from experiments.batch_size import EffectiveBatchSize
from experiments.run_dir import newest_checkpoint, pin_run_folder, resolve_ckpt_path
from tests.helpers import ROOT, tiny_overrides

EXPERIMENT = ROOT / "configs/experiments/e2e_ft_depth_marigold.yaml"


def slurm_env(monkeypatch, nodes: int, per_node: int, rank: int, job_id: str = "4242") -> None:
    """The variables srun sets for one task of a `--nodes N --ntasks-per-node G` job."""
    values = {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "dgft", "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes), "SLURM_NODELIST": "gpu[001-004]",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
        "MASTER_ADDR": "127.0.0.1",  # Lightning writes it into os.environ; monkeypatch removes it afterwards
    }  # fmt: skip
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)


def accumulation(cli) -> int:
    """What the effective-batch callback sets when `fit` starts with this trainer's world size and datamodule.

    Its `setup` hook gets a view of the trainer's public attributes with the CLI's datamodule attached: a real
    `fit` would start 32 DDP processes, and attaching a datamodule without `fit` is private Lightning API.
    """
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EffectiveBatchSize))
    trainer = SimpleNamespace(datamodule=cli.datamodule, accumulate_grad_batches=cli.trainer.accumulate_grad_batches,
                              num_devices=cli.trainer.num_devices, num_nodes=cli.trainer.num_nodes)  # fmt: skip
    callback.setup(trainer, cli.model, "fit")
    return trainer.accumulate_grad_batches


def test_four_nodes_of_eight_gpus_under_slurm(tmp_path, monkeypatch):
    slurm_env(monkeypatch, nodes=4, per_node=8, rank=13)
    args = ["--config", str(EXPERIMENT), "--config", str(ROOT / "configs/trainer/slurm.yaml")]
    args += tiny_overrides(tmp_path)
    cli = main([*args, "--data.init_args.batch_size=1"], run=False)
    trainer = cli.trainer
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR1
    assert isinstance(trainer.strategy, DDPStrategy) and str(trainer.precision) == "bf16-mixed"
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (4, 8, 32)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (13, 5, 1)
    # The run folder is named after the job, which a requeue keeps: logs, checkpoints and hpc_ckpt_* stay together.
    run = tmp_path / "runs/paper_depth/e2e_ft_marigold/job_4242"
    assert trainer.logger.log_dir == str(run) and trainer.default_root_dir == str(run)
    assert accumulation(cli) == 1  # 32 = micro-batch 1 x 8 GPUs x 4 nodes x 1

    with pytest.raises(ValueError, match="not a multiple"):  # micro-batch 2 would make 64 per step
        accumulation(main(args, run=False))


@pytest.mark.parametrize("devices, expected", [(1, 16), (2, 8), (8, 2)])
def test_accumulation_is_derived_for_the_device_count(tmp_path, monkeypatch, devices, expected):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    overlay = ROOT / "configs/trainer/ddp.yaml"
    args = ["--config", str(EXPERIMENT), "--config", str(overlay), *tiny_overrides(tmp_path)]
    cli = main([*args, f"--trainer.devices={devices}"], run=False)
    assert cli.trainer.num_devices == devices and isinstance(cli.trainer.strategy, DDPStrategy)
    assert accumulation(cli) == expected


def logger_config(version=None, save_dir="runs", name="paper_depth/x") -> Namespace:
    init_args = Namespace(save_dir=save_dir, name=name, version=version)
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=init_args)
    return Namespace(logger=logger, default_root_dir=None)


def test_run_folder_is_pinned_by_version_or_job_id():
    trainer = logger_config()
    pin_run_folder(trainer, {"SLURM_JOB_ID": "77"})
    assert trainer.logger.init_args.version == "job_77"
    assert trainer.default_root_dir == str(Path("runs/paper_depth/x/job_77"))
    trainer = logger_config()
    pin_run_folder(trainer, {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"})
    assert trainer.logger.init_args.version == "job_70_3"
    trainer = logger_config()  # an interactive allocation holds many runs: no job-id folder
    pin_run_folder(trainer, {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "interactive"})
    assert trainer.logger.init_args.version is None and trainer.default_root_dir is None
    trainer = logger_config(version="baseline")  # an explicit version wins over the job id
    pin_run_folder(trainer, {"SLURM_JOB_ID": "77"})
    assert trainer.default_root_dir == str(Path("runs/paper_depth/x/baseline"))
    trainer = logger_config(version=3)
    pin_run_folder(trainer, {})
    assert trainer.default_root_dir == str(Path("runs/paper_depth/x/version_3"))
    trainer = logger_config()  # outside SLURM without a version: Lightning's version_N, nothing pinned
    pin_run_folder(trainer, {})
    assert trainer.logger.init_args.version is None and trainer.default_root_dir is None
    trainer = logger_config()
    trainer.default_root_dir = "elsewhere"
    pin_run_folder(trainer, {"SLURM_JOB_ID": "77"})
    assert trainer.default_root_dir == "elsewhere"


def test_auto_resume_picks_the_newest_checkpoint(tmp_path):
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # nothing yet: start fresh
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints/last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "checkpoints/step=2.ckpt").write_text("x")  # not a resume candidate
    for path, age in ((hpc, 20), (last, 10)):  # the periodic checkpoint was written after the old hpc one
        path.write_text("x")
        os.utime(path, (time.time() - age, time.time() - age))
    assert newest_checkpoint(tmp_path) == last
    os.utime(hpc, None)
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(hpc)
    assert resolve_ckpt_path("some.ckpt", None) == "some.ckpt" and resolve_ckpt_path(None, None) is None
    with pytest.raises(ValueError, match="needs a run folder"):
        resolve_ckpt_path("auto", None)


def test_sbatch_template_builds_a_working_command(tmp_path, monkeypatch):
    script = (ROOT / "slurm/train.sbatch").read_text()
    lines = [line[len("#SBATCH --") :] for line in script.splitlines() if line.startswith("#SBATCH --")]
    directives = dict(line.split("=", 1) for line in lines if "=" in line)
    assert directives["signal"] == "SIGUSR1@90" and "#SBATCH --requeue" in script.splitlines()
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8" and directives["nodes"] == "4"

    # Run the script with a stand-in srun that records the command it would start on every task.
    bin_dir, recorded = tmp_path / "bin", tmp_path / "srun.args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {recorded}\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242"}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "slurm/train.sbatch"), str(EXPERIMENT), "--trainer.max_steps", "7"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = recorded.read_text().splitlines()
    assert command[1:4] == ["-m", "experiments", "fit"]
    assert command[-4:] == ["--ckpt_path", "auto", "--trainer.max_steps", "7"]

    slurm_env(monkeypatch, nodes=4, per_node=8, rank=0)
    micro = command[command.index("--data.init_args.batch_size") + 1]
    assert micro == "1"  # 32 GPUs: 32 = 1 x 32 x accumulation 1
    args = [a for a in command[4:] if a not in ("--ckpt_path", "auto")]
    cli = main([*args, *tiny_overrides(tmp_path), f"--data.init_args.batch_size={micro}"], run=False)
    assert (cli.trainer.num_nodes, cli.trainer.num_devices, cli.trainer.max_steps) == (4, 8, 7)
    assert accumulation(cli) == 1 and cli.datamodule.batch_size == 1
