"""A run's stable identity on clusters: its TensorBoard version, its run folder and `--ckpt_path auto`.

A requeued SLURM job keeps its job id, so a TensorBoard logger without an explicit `version` gets `job_<id>`;
`trainer.default_root_dir` (where Lightning writes and looks for `hpc_ckpt_*.ckpt`) then defaults to the logger's
version folder, next to the events and `checkpoints/`. Requeues and reruns with the same version therefore log
into, save into and resume from one folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from jsonargparse import Namespace

AUTO = "auto"
RESUMABLE_PATTERNS = ("hpc_ckpt_*.ckpt", "last*.ckpt")


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """The job id as SLURM keeps it across requeues (array tasks: `<array job>_<task>`, as Lightning names them).

    None in an interactive allocation (job name `bash` or `interactive`, Lightning's rule), whose runs are separate.
    """
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def pin_run_folder(trainer: Namespace, env: Mapping[str, str] = os.environ) -> None:
    """Name a versionless TensorBoard logger `job_<SLURM job id>`; put an unset default_root_dir in its folder."""
    logger = trainer.get("logger")
    if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return
    args = logger.init_args
    job = slurm_job_id(env)
    if args.get("version") is None and job is not None:
        args.version = f"job_{job}"  # not a bare number, which the logger would turn into `version_<n>`
    if args.get("version") is None or trainer.get("default_root_dir") is not None:
        return
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    trainer.default_root_dir = str(Path(args.save_dir) / (args.get("name") or "") / version)


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently written `hpc_ckpt_*.ckpt` or `last*.ckpt` under `root` (any depth), or None."""
    found = [path for pattern in RESUMABLE_PATTERNS for path in Path(root).rglob(pattern) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def resolve_ckpt_path(ckpt_path: str | Path | None, default_root_dir: str | None) -> str | Path | None:
    """`auto`: the newest resumable checkpoint of the run folder (None = start fresh); other values unchanged."""
    if ckpt_path != AUTO:
        return ckpt_path
    if default_root_dir is None:
        raise ValueError(
            "--ckpt_path auto needs a run folder: set trainer.default_root_dir, or a logger version "
            "(trainer.logger.init_args.version, or SLURM_JOB_ID under SLURM)"
        )
    found = newest_checkpoint(default_root_dir)
    return str(found) if found is not None else None
