"""Peak host memory of one training configuration, measured in a fresh process each (peaks never carry over).

Each probe is a new process forked from a `forkserver` that has imported the benchmark but never built a model, so
the imports are paid once; the child builds the model, runs `warmup + 1` steps of one implementation and returns
VmRSS after the set-up and VmHWM (the peak resident set) at the end, from /proc/self/status.
"""

from __future__ import annotations

import multiprocessing
import resource
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.benchmark.train import Config, TrainSettings


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start VmHWM afresh at the current RSS (Linux >= 4.0); harmless where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def probe(payload: dict[str, Any]) -> dict[str, float]:
    """In the child: build, run one implementation of one configuration, report model and peak RSS in MB."""
    import torch

    from experiments.benchmark.train import Config, Setup, TrainSettings, set_impl_layout

    reset_peak()
    if payload["threads"]:
        torch.set_num_threads(payload["threads"])
    settings = TrainSettings(**{**payload["settings"], "impls": [payload["impl"]]})
    setup = Setup(settings)
    config = Config(**payload["config"])
    runner = setup.runner(payload["impl"], config)
    set_impl_layout(setup.model.core, config, payload["impl"])
    model_mb = status_mb("VmRSS")
    runner.run(settings.warmup, 1)
    return {"model_mb": model_mb, "peak_mb": status_mb("VmHWM")}


class Prober:
    """Runs probes one at a time, each in a new process; use as a context manager."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["experiments.benchmark.train"])
        self.pool = context.Pool(1, maxtasksperchild=1)

    def peak(self, settings: TrainSettings, config: Config, impl: str, threads: int | None) -> dict[str, float]:
        payload = {"settings": asdict(settings), "config": asdict(config), "impl": impl, "threads": threads}
        return self.pool.apply(probe, (payload,))

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.terminate()
        self.pool.join()
