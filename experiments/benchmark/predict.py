"""The predict mode: latency of `predictor.predict` against the bare floor, and `experiments.infer` folder throughput.

The floor is the least work a prediction needs: one VAE encode, the UNet calls, one VAE decode per member, of an
already padded tensor on the device, nothing else. Ours is `predictor.predict(core, task, images, ...)` on one image
[1,3,H,W] in [0, 1] on the device (resize and pad, encode, members, unpad, ensemble, resize back). Both are timed
interleaved, so they see the same machine state; the floor is also timed alone first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark.data import write_png_folder
from experiments.benchmark.models import BenchModel, build_model
from experiments.benchmark.timing import Stats, clock, interleaved
from lightning_modules.evaluation import EvalSpec
from lightning_modules.export import export_to_diffusers
from lightning_modules.inference import InferenceSpec
from lightning_modules.predictor import _predict_members, predict, processing_size


@dataclass
class PredictSettings:
    """What the predict mode measures; every field is written to the JSON."""

    arch: str = "tiny"
    device: str = "cpu"
    height: int = 480
    width: int = 640
    processing_resolution: int = 0
    steps: int = 10
    members: int = 10
    precisions: list[str] = field(default_factory=lambda: ["32-true"])
    warmup: int = 1
    iters: int = 3
    repeats: int = 3
    images: int = 64
    sweep: bool = False
    sweep_sizes: list[int] = field(default_factory=lambda: [128, 256, 384, 512, 640, 768])
    sweep_members: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    seed: int = 0


def padded_size(height: int, width: int, resolution: int, factor: int) -> tuple[int, int]:
    """The size the UNet sees: processing size, padded up to a multiple of the VAE factor."""
    h, w = processing_size(height, width, resolution)
    return -(-h // factor) * factor, -(-w // factor) * factor


class Floor:
    """One VAE encode, `steps` x `members` UNet calls and `members` decodes of a padded tensor, under no_grad."""

    def __init__(self, model: BenchModel, size: tuple[int, int], bf16: bool, steps: int = 1, members: int = 1) -> None:
        core = model.core
        device = core.empty_text_embedding.device
        self.core, self.bf16, self.steps, self.members, self.device = core, bf16, steps, members, device
        self.x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        self.t = torch.full((1,), core.num_train_timesteps - 1, device=device, dtype=torch.long)

    @torch.no_grad()
    def __call__(self) -> None:
        core = self.core
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z_rgb = core.vae.encode(self.x).latent_dist.mode() * core.latent_scale
            context = core.empty_text_embedding.to(z_rgb.dtype)
            for _ in range(self.members):
                z = torch.zeros_like(z_rgb)
                for _ in range(self.steps):
                    z = core.unet(torch.cat([z_rgb, z], dim=1), self.t, encoder_hidden_states=context).sample
                core.vae.decode(z / core.latent_scale)


class Ours:
    """`predictor.predict` on one image, as infer and evaluation call it; remembers the UNet calls per image."""

    def __init__(
        self, model: BenchModel, s: PredictSettings, size: tuple[int, int], bf16: bool, steps: int, members: int
    ):
        device = model.core.empty_text_embedding.device
        self.model, self.resolution, self.members, self.bf16 = model, s.processing_resolution, members, bf16
        self.images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
        init = "zeros" if members == 1 else "gaussian"
        self.spec = InferenceSpec(num_steps=steps, spacing="trailing", init_latent=init, seed=s.seed)
        self.options = model.task.ensemble_options(EvalSpec())
        self.unet_calls = 0

    def __call__(self) -> None:
        result = predict(
            self.model.core, self.model.task, self.images, self.resolution, self.members, self.spec, batch_size=1,
            ensemble_options=self.options, bf16=self.bf16,
        )  # fmt: skip
        self.unet_calls = result["unet_calls"]


def per_call(fn: Any, iters: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `iters` calls."""
    start = clock(device)
    for _ in range(iters):
        fn()
    return (clock(device) - start) / iters


def ours_vs_floor(
    model: BenchModel, s: PredictSettings, size: tuple[int, int], bf16: bool, steps: int, members: int
) -> dict[str, Any]:
    """Per-image latency of ours and of the floor (alone, then interleaved with ours), in ms, and their ratio."""
    device = model.core.empty_text_embedding.device
    ours = Ours(model, s, size, bf16, steps, members)
    floor = Floor(model, padded_size(*size, s.processing_resolution, model.core.vae_scale_factor), bf16, steps, members)
    for _ in range(s.warmup):
        ours()
        floor()
    alone = Stats.of([per_call(floor, s.iters, device) for _ in range(s.repeats)])
    times = interleaved(
        {"ours": lambda: per_call(ours, s.iters, device), "floor": lambda: per_call(floor, s.iters, device)}, s.repeats
    )
    ours_ms, floor_ms = Stats.of(times["ours"]).scaled(1000), Stats.of(times["floor"]).scaled(1000)
    ensemble_ms = ensemble_cost(ours, s.repeats).scaled(1000).as_dict() if members > 1 else None
    return dict(
        height=size[0], width=size[1], steps=steps, members=members, unet_calls=ours.unet_calls,
        ours_ms=ours_ms.as_dict(), floor_ms=floor_ms.as_dict(), floor_alone_ms=alone.scaled(1000).as_dict(),
        ours_vs_floor=ours_ms.median / floor_ms.median, ensemble_ms=ensemble_ms,
    )  # fmt: skip


def ensemble_cost(ours: Ours, repeats: int) -> Stats:
    """Seconds of the task's ensembling alone, on the members one of ours' predictions fuses (part of ours' time)."""
    core, task = ours.model.core, ours.model.task
    size = processing_size(*ours.images.shape[-2:], ours.resolution)
    with torch.no_grad():
        members = _predict_members(core, task, ours.images, size, ours.members, ours.spec, 1, ours.bf16)[0]
    device = members.device
    return Stats.of([per_call(lambda: task.ensemble(members, ours.options), 1, device) for _ in range(repeats)])


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars or load advice from diffusers and transformers (each infer run loads a model); restored."""
    import diffusers
    import transformers

    logs = [diffusers.utils.logging, transformers.utils.logging]
    before = [(log.get_verbosity(), log.is_progress_bar_enabled()) for log in logs]
    for log in logs:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, (verbosity, bars) in zip(logs, before):
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()


def _infer(argv: list[str]) -> tuple[float, float | None]:
    """Run `experiments.infer.main(argv)` in this process; (wall seconds, model load seconds it printed)."""
    from experiments.infer import main as infer_main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = infer_main(argv)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"experiments.infer exited with {status}:\n{out.getvalue()[-3000:]}")
    load = re.search(r"model load ([0-9.]+) s", out.getvalue())
    return seconds, float(load.group(1)) if load else None


def infer_throughput(model: BenchModel, s: PredictSettings, bf16: bool) -> dict[str, Any]:
    """Images/s of `python -m experiments.infer` on a folder of PNGs (reading and writing included) against the
    floor's images/s at the same processing size, measured around each infer run."""
    device = model.core.empty_text_embedding.device
    floor = Floor(model, padded_size(s.height, s.width, s.processing_resolution, model.core.vae_scale_factor), bf16)
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="dgft-bench-infer-") as tmp:
        root = Path(tmp)
        images = write_png_folder(root / "images", s.images, s.height, s.width, s.seed)
        warm = write_png_folder(root / "warm", 2, s.height, s.width, s.seed + 1)
        text = model.save_text_components(root / "text")
        folder = export_to_diffusers(
            model.core, model.task, root / "model", processing_resolution=s.processing_resolution,
            tokenizer_source=str(text),
        )  # fmt: skip

        def argv(source: Path) -> list[str]:
            return [
                "--model", str(folder), "--input", str(source), "--output", str(root / "out"), "--overwrite",
                "--processing_resolution", str(s.processing_resolution), "--steps", "1", "--spacing", "trailing",
                "--init", "zeros", "--device", device.type, *(["--bf16"] if bf16 else []),
            ]  # fmt: skip

        _infer(argv(warm))
        floor()
        runs: list[tuple[float, float | None]] = []
        floor_times = interleaved(
            {"infer": lambda: runs.append(_infer(argv(images))) or runs[-1][0],
             "floor": lambda: per_call(floor, min(s.images, 8), device)},
            s.repeats,
        )  # fmt: skip
    seconds = Stats.of(floor_times["infer"])
    floor_ips = 1 / Stats.of(floor_times["floor"]).median
    loads = [load for _, load in runs if load is not None]
    load = Stats.of(loads).median if loads else None
    ips = s.images / seconds.median
    ips_no_load = s.images / (seconds.median - load) if load is not None else None
    return dict(
        images=s.images, height=s.height, width=s.width, seconds=seconds.as_dict(), model_load_s=load,
        images_per_s=ips, images_per_s_without_load=ips_no_load, floor_images_per_s=floor_ips,
        vs_floor=ips / floor_ips, vs_floor_without_load=ips_no_load / floor_ips if ips_no_load else None,
    )  # fmt: skip


def run_predict(s: PredictSettings) -> dict[str, Any]:
    """Per precision: single step, N steps x K members, infer throughput; the sweeps for the plots if asked.

    Only the single step times `s.iters` predictions per round; the multi-step row and the sweeps time one.
    """
    device = torch.device(s.device)
    model = build_model(s.arch, device, s.seed)
    model.core.eval()
    size = (s.height, s.width)
    once = dataclasses.replace(s, iters=1)  # the multi-step row and the sweeps: one prediction per round
    results: dict[str, Any] = {"rows": [], "infer": [], "sweep_size": [], "sweep_members": []}
    for precision in s.precisions:
        bf16 = precision == "bf16-mixed"
        for steps, members in [(1, 1)] + ([(s.steps, s.members)] if s.steps and s.members else []):
            timing = s if steps == members == 1 else once
            row = {"precision": precision, **ours_vs_floor(model, timing, size, bf16, steps, members)}
            results["rows"].append(row)
            print(f"predict {precision} {steps} steps x {members}: ours {row['ours_ms']['median']:.1f} ms, "
                  f"floor {row['floor_ms']['median']:.1f} ms", flush=True)  # fmt: skip
        if s.images:
            row = {"precision": precision, **infer_throughput(model, s, bf16)}
            results["infer"].append(row)
            print(f"infer {precision}: {row['images_per_s']:.2f} images/s, floor {row['floor_images_per_s']:.2f}")
    if s.sweep:
        bf16 = s.precisions[0] == "bf16-mixed"
        for edge in s.sweep_sizes:
            sweep_size = (max(8, edge * 3 // 4 // 8 * 8), edge)
            row = ours_vs_floor(model, dataclasses.replace(once, processing_resolution=0), sweep_size, bf16, 1, 1)
            results["sweep_size"].append({"long_edge": edge, **row})
        for members in s.sweep_members:
            results["sweep_members"].append(ours_vs_floor(model, once, size, bf16, 1, members))
    return results
