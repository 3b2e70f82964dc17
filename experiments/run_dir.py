"""A run's stable identity on clusters: its TensorBoard version, its run folder and `--ckpt_path auto`.

A requeued SLURM job keeps its job id, so a TensorBoard logger without an explicit `version` gets `job_<id>`;
`trainer.default_root_dir` (where Lightning writes and looks for `hpc_ckpt_*.ckpt`) then defaults to the logger's
version folder, next to the events and `checkpoints/`. Requeues and reruns with the same version therefore log
into, save into and resume from one folder.

One folder holds one run: `check_fresh_run_folder` refuses a `fit` into a folder that already holds an earlier run's
checkpoints unless it resumes that run, and `move_aside` keeps an earlier folder under a new name (the demo).
`--ckpt_path auto` skips checkpoints that are not whole (`checkpoint_problem`) and says which one it uses.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

AUTO = "auto"
RESUMABLE_PATTERNS = ("hpc_ckpt_*.ckpt", "last*.ckpt")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (the default since torch 1.6, what Lightning writes)
log = logging.getLogger(__name__)


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


def _by_age(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)


def checkpoint_candidates(root: str | Path) -> list[Path]:
    """Every checkpoint under `root`, newest first: `hpc_ckpt_*` and `last*` ones, then the periodic ones."""
    found = {path for pattern in RESUMABLE_PATTERNS for path in Path(root).rglob(pattern) if path.is_file()}
    others = {path for path in Path(root).rglob("*.ckpt") if path.is_file()} - found
    return _by_age(list(found)) + _by_age(list(others))


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently written `hpc_ckpt_*.ckpt` or `last*.ckpt` under `root` (any depth), or None."""
    found = [path for pattern in RESUMABLE_PATTERNS for path in Path(root).rglob(pattern) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint file cannot be whole (None: it looks whole), without loading its tensors.

    A torch.save archive (a zip) must have its central directory, which sits at the end, so a truncated file
    fails here, and its `data.pkl` must read back with a matching CRC. An empty file is broken; a file in torch's
    legacy (non-zip) format cannot be checked this cheaply and passes.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
    except OSError as error:
        return f"unreadable ({type(error).__name__}: {error})"
    if size == 0:
        return "empty file"
    if ZIP_MAGIC[: len(head)] != head:
        return None  # not a zip archive at all: torch's legacy format, which has no cheap integrity check
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not pickles:
                return "a zip archive without data.pkl (not a torch checkpoint)"
            archive.read(pickles[0])  # checks the CRC of the pickled structure
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        return f"not a complete torch archive, probably cut short while being written ({size} bytes; {error})"
    return None


def resolve_ckpt_path(ckpt_path: str | Path | None, default_root_dir: str | None) -> str | Path | None:
    """`auto`: the newest whole checkpoint of the run folder (None = start fresh); other values unchanged.

    `hpc_ckpt_*` and `last*` checkpoints are tried newest first, then the periodic ones; each that is not whole is
    skipped with a warning that names it and why, and the one used is named. Raises when checkpoints exist but none
    is whole (starting over would silently drop the run's progress).
    """
    if ckpt_path != AUTO:
        return ckpt_path
    if default_root_dir is None:
        raise ValueError(
            "--ckpt_path auto needs a run folder: set trainer.default_root_dir, or a logger version "
            "(trainer.logger.init_args.version, or SLURM_JOB_ID under SLURM)"
        )
    skipped = []
    for candidate in checkpoint_candidates(default_root_dir):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if skipped:
                log.warning("--ckpt_path auto: resuming from %s, the newest whole checkpoint", candidate)
            return str(candidate)
        skipped.append(f"{candidate}: {problem}")
        log.warning("--ckpt_path auto: skipped %s: %s", candidate, problem)
    if skipped:
        raise FileNotFoundError(
            f"--ckpt_path auto: no checkpoint under {default_root_dir} is whole:\n  "
            + "\n  ".join(skipped)
            + "\nMove them away to start over, or pass --ckpt_path <file>."
        )
    return None


def _slurm_hpc_resume(default_root_dir: str | None, env: Mapping[str, str]) -> bool:
    """Whether Lightning itself resumes (no ckpt_path, under srun, an `hpc_ckpt_<n>.ckpt` in the root dir)."""
    under_srun = "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    return under_srun and default_root_dir is not None and any(Path(default_root_dir).glob("hpc_ckpt_*.ckpt"))


def check_fresh_run_folder(trainer: Any, ckpt_path: str | Path | None, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a `fit` whose logger folder already holds another run's checkpoints (FileExistsError).

    Two runs in one folder mix their event files, and ModelCheckpoint would write `last-v1.ckpt` next to the old
    `last.ckpt`, which then names the older run. Allowed: a new folder (no fixed version: Lightning's next
    `version_N`), a folder without checkpoints, `--ckpt_path auto`, an explicit checkpoint inside that folder (a
    resume), and Lightning's own SLURM requeue (no ckpt_path, under srun, `hpc_ckpt_*` in the root dir).
    Call it in `before_fit`, before `resolve_ckpt_path`.
    """
    logger = getattr(trainer, "logger", None)
    if logger is None or ckpt_path == AUTO:
        return
    version, log_dir = getattr(logger, "_version", None), getattr(logger, "log_dir", None)
    # fast_dev_run swaps in a DummyLogger, whose attributes are no-op callables and whose log_dir is None
    if not isinstance(version, (str, int)) or not isinstance(log_dir, (str, os.PathLike)):
        return
    folder = Path(log_dir)
    found = sorted(folder.rglob("*.ckpt")) if folder.is_dir() else []
    if not found:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve() in {path.resolve() for path in found}:
        return
    if ckpt_path is None and _slurm_hpc_resume(getattr(trainer, "default_root_dir", None), env):
        return
    names = ", ".join(str(path.relative_to(folder)) for path in found[:3]) + (", ..." if len(found) > 3 else "")
    raise FileExistsError(
        f"{folder} already holds a run ({len(found)} checkpoint file{'s' * (len(found) != 1)}: {names}). "
        "Pass --ckpt_path auto to resume it, "
        f"choose another version (--trainer.logger.init_args.version=<new>), or move the folder away."
    )


def move_aside(folder: str | Path, label: str = "old", now: float | None = None) -> Path | None:
    """Rename an existing, non-empty `folder` to `<folder>.<label>-YYYYmmdd-HHMMSS` and return the new path.

    None when there is nothing to move. The name gets a counter if that name exists (two moves in one second).
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    aside = folder.with_name(f"{folder.name}.{label}-{stamp}")
    counter = 1
    while aside.exists():
        aside = folder.with_name(f"{folder.name}.{label}-{stamp}-{counter}")
        counter += 1
    os.replace(folder, aside)
    return aside
