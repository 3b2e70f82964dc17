"""The train mode: time per optimiser step, samples/s and peak memory of ours, the bare loop and the reference.

Configurations are objective x gradient checkpointing x precision; within one, the three implementations run in
the same process on the same core, interleaved round by round (`timing.interleaved`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark import memory
from experiments.benchmark.data import fixed_batch, read_raw_samples, write_random_shards
from experiments.benchmark.loops import LightningRun, StepRunner
from experiments.benchmark.models import BenchModel, build_model, estimator_for, set_checkpointing
from experiments.benchmark.reference import ReferenceStep
from experiments.benchmark.timing import Stats, interleaved
from lightning_modules.objectives import DiffusionObjective, E2EObjective, Objective
from lightning_modules.speed import SpeedSpec, set_layout

OBJECTIVES: dict[str, type[Objective]] = {"e2e": E2EObjective, "diffusion": DiffusionObjective}
PRECISIONS = ("32-true", "bf16-mixed")
IMPLS = ("lightning", "bare", "reference")
GIB = 2**30
FITS_24GB = 23 * GIB  # peak reserved by the caching allocator, leaving about 1 GiB for the CUDA context


@dataclass
class TrainSettings:
    """What the train mode measures; every field is written to the JSON."""

    arch: str = "tiny"
    device: str = "cpu"
    batch: int = 2
    height: int = 480
    width: int = 640
    objectives: list[str] = field(default_factory=lambda: ["e2e", "diffusion"])
    checkpointing: list[bool] = field(default_factory=lambda: [False, True])
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    warmup: int = 1
    iters: int = 3
    repeats: int = 3
    channels_last: list[bool] = field(default_factory=lambda: [False])
    contiguous_group_norm: list[bool] = field(default_factory=lambda: [True])
    optimizer_impl: str = "auto"
    memory: bool = True
    grad_clip: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """One training configuration."""

    objective: str
    checkpointing: bool
    precision: str
    channels_last: bool = False
    contiguous_group_norm: bool = True


def configs(s: TrainSettings) -> list[Config]:
    return [
        Config(o, c, p, m, g)
        for o in s.objectives
        for c in s.checkpointing
        for p in s.precisions
        for m in s.channels_last
        for g in s.contiguous_group_norm
    ]


class Setup:
    """The model, the fixed batch, raw shard samples for the reference, and our LightningModule around the core."""

    def __init__(self, s: TrainSettings) -> None:
        self.settings, self.device = s, torch.device(s.device)
        self.model: BenchModel = build_model(s.arch, self.device, s.seed)
        self.batch = fixed_batch(s.height, s.width, s.batch, self.device, s.seed)
        self.raw: list[dict[str, Any]] = []
        if "reference" in s.impls:
            with tempfile.TemporaryDirectory(prefix="dgft-bench-train-") as tmp:
                count = max(8, 2 * s.batch)
                self.raw = read_raw_samples(write_random_shards(Path(tmp), count, s.height, s.width, count, s.seed))
        self.module = estimator_for(self.model.core, E2EObjective(), self.model.task.name)

    def runner(self, impl: str, config: Config) -> LightningRun | StepRunner:
        """Implementation `impl` set to `config` (checkpointing is switched on the shared core)."""
        s, core, task = self.settings, self.model.core, self.model.task
        objective = OBJECTIVES[config.objective]()
        set_checkpointing(core, config.checkpointing)
        if impl == "lightning":
            self.module.objective = objective
            self.module.speed = SpeedSpec(
                channels_last=config.channels_last,
                contiguous_group_norm=config.contiguous_group_norm,
                optimizer_impl=s.optimizer_impl,
            )
            return LightningRun(self.module, self.batch, self.device, config.precision, s.grad_clip)
        if impl == "bare":
            bf16 = config.precision == "bf16-mixed"
            return StepRunner(core, task, objective, self.device, bf16, self.batch, s.grad_clip, s.optimizer_impl)
        if impl == "reference":
            return ReferenceStep(core, task, objective, self.raw, s.batch, self.device, s.grad_clip, s.seed)
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def set_impl_layout(core: torch.nn.Module, config: Config, impl: str) -> None:
    """Ours and the bare loop in the configuration's layout and GroupNorm route (SpeedSpec.channels_last,
    .contiguous_group_norm); the reference as diffusers builds it (contiguous weights, plain nn.GroupNorm)."""
    ours = impl != "reference"
    set_layout(core, config.channels_last and ours, config.contiguous_group_norm and ours)


def measure_config(setup: Setup, config: Config) -> dict[str, dict[str, Any]]:
    """Seconds per step of each implementation over the rounds, and its CUDA peak (None on the CPU)."""
    s, device = setup.settings, setup.device
    runners = {impl: setup.runner(impl, config) for impl in s.impls}
    peaks: dict[str, tuple[int, int]] = {impl: (0, 0) for impl in s.impls}

    def run(impl: str) -> float:
        set_impl_layout(setup.model.core, config, impl)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = runners[impl].run(s.warmup, s.iters)
        if device.type == "cuda":
            allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
            peaks[impl] = (max(peaks[impl][0], allocated), max(peaks[impl][1], reserved))
        return seconds

    times = interleaved({impl: (lambda impl=impl: run(impl)) for impl in s.impls}, s.repeats)
    result = {}
    for impl in s.impls:
        stats = Stats.of(times[impl])
        entry: dict[str, Any] = dict(ms_per_step=stats.scaled(1000).as_dict(), samples_per_s=s.batch / stats.median)
        if device.type == "cuda":
            allocated, reserved = peaks[impl]
            entry.update(
                peak_mb=allocated / 2**20, peak_reserved_mb=reserved / 2**20, peak_kind="cuda_max_allocated",
                fits_24gb=reserved <= FITS_24GB,
            )  # fmt: skip
        result[impl] = entry
    return result


def run_train(s: TrainSettings) -> list[dict[str, Any]]:
    """One row per configuration: each implementation's step time, samples/s and peak memory, and ours' ratios."""
    rss: dict[tuple[Config, str], dict[str, float]] = {}
    if s.memory and s.device == "cpu":  # first, before this process holds a model: one fresh process each
        with memory.Prober() as prober:
            for config in configs(s):
                for impl in s.impls:
                    rss[config, impl] = prober.peak(s, config, impl, torch.get_num_threads())
                    print(f"memory {config} {impl}: peak RSS {rss[config, impl]['peak_mb']:.0f} MB", flush=True)
    setup = Setup(s)
    rows = []
    for config in configs(s):
        impls = measure_config(setup, config)
        for impl, entry in impls.items():
            if (config, impl) in rss:
                entry.update(rss[config, impl], peak_kind="rss_vmhwm_fresh_process")
        row: dict[str, Any] = {**asdict(config), "impls": impls}
        ours = impls.get("lightning", {}).get("ms_per_step", {}).get("median")
        for other, key in (("bare", "time_vs_bare"), ("reference", "speedup_vs_reference")):
            theirs = impls.get(other, {}).get("ms_per_step", {}).get("median")
            row[key] = None if ours is None or theirs is None else (ours / theirs if other == "bare" else theirs / ours)
        rows.append(row)
        line = ", ".join(f"{impl} {e['ms_per_step']['median']:.0f} ms" for impl, e in impls.items())
        print(f"train {config}: {line}", flush=True)
    return rows
