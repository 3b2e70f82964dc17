"""Build the framework's stand-in for Stable Diffusion 2 once, into a cache: `python -m experiments.standin`.

Two LightningCLI `fit` runs (docs/standin.md): stage 1 pretrains the autoencoder (`configs/standin/autoencoder.yaml`),
stage 2 the image prior on its latents (`configs/standin/prior.yaml`); the result is one folder in Stable
Diffusion 2 layout. The cache entry is keyed by the stage configs' text and the extra arguments, so a changed
setting builds a new entry. Stage outputs are kept as they finish and a stage resumes from its last checkpoint,
so an interrupted build continues; the SD2 folder appears by an atomic rename, so a complete-looking folder is
always complete. Configs name it `pretrained: standin:sd2`; the CLI resolves that to the built folder.

    python -m experiments.standin [--rebuild] [--samples PNG] [--reconstructions PNG] [CLI overrides for both stages]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from datamodules.synthetic import cache_root

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "standin"
STAGE_CONFIGS = {"autoencoder": CONFIG_DIR / "autoencoder.yaml", "prior": CONFIG_DIR / "prior.yaml"}
SHARED_CONFIGS = (CONFIG_DIR / "data.yaml", CONFIG_DIR.parent / "trainer" / "cpu.yaml")
STANDIN_SCHEME = "standin:"
REPORT = "report.json"


def standin_key(overrides: list[str]) -> str:
    """Hash of every config the stages read plus the extra arguments."""
    digest = hashlib.sha1()
    for path in (*STAGE_CONFIGS.values(), *SHARED_CONFIGS):
        digest.update(path.read_bytes())
    digest.update(json.dumps(overrides).encode())
    return digest.hexdigest()[:10]


def standin_dir(overrides: list[str] | None = None) -> Path:
    return cache_root() / "standin" / standin_key(list(overrides or []))


def _run_stage(stage: str, entry: Path, extra: list[str]):
    """One LightningCLI fit of a stage, logging and checkpointing under the cache entry, resumed if interrupted."""
    from experiments.__main__ import main

    run_dir = entry / "logs" / stage
    args = [
        "fit",
        "--config", str(STAGE_CONFIGS[stage]),
        "--trainer.logger.init_args.save_dir", str(entry / "logs"),
        "--trainer.logger.init_args.name", stage,
        "--trainer.logger.init_args.version", "run",
        "--trainer.default_root_dir", str(run_dir / "run"),
        "--ckpt_path", "auto",
        *extra,
    ]  # fmt: skip
    cli = main(args)
    trainer = cli.trainer
    if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
        raise RuntimeError(
            f"stand-in stage {stage} stopped at step {trainer.global_step} of {trainer.max_steps}; rerun to resume"
        )
    return cli


def _validation_metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def build_standin(overrides: list[str] | None = None, rebuild: bool = False) -> Path:
    """The SD2-layout stand-in folder for these settings, built (or finished) first if needed."""
    overrides = list(overrides or [])
    entry = standin_dir(overrides)
    final = entry / "sd2"
    if rebuild and entry.exists():
        shutil.rmtree(entry)
    if (final / "model_index.json").is_file():
        return final
    entry.mkdir(parents=True, exist_ok=True)
    report_path = entry / REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"overrides": overrides}
    started = time.perf_counter()
    autoencoder = entry / "autoencoder"
    if not (autoencoder / "config.json").is_file():
        print(f"[standin] stage 1/2: autoencoder pretraining -> {autoencoder}", flush=True)
        t0 = time.perf_counter()
        cli = _run_stage("autoencoder", entry, overrides)
        tmp = entry / "autoencoder.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cli.model.vae.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, autoencoder)
        report["autoencoder"] = {"seconds": time.perf_counter() - t0, **_validation_metrics(cli)}
        report["autoencoder"]["scaling_factor"] = float(cli.model.vae.config.scaling_factor)
        report_path.write_text(json.dumps(report, indent=1))
    print(f"[standin] stage 2/2: image prior pretraining on {autoencoder}", flush=True)
    t0 = time.perf_counter()
    cli = _run_stage("prior", entry, ["--model.init_args.autoencoder", str(autoencoder), *overrides])
    report["prior"] = {"seconds": time.perf_counter() - t0, **_validation_metrics(cli)}
    from lightning_modules.standin_folder import save_sd2_folder

    prior = cli.model.cpu()
    tmp = entry / "sd2.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_sd2_folder(prior.unet, prior.vae, prior.text_encoder, prior.tokenizer, tmp)
    report["build_seconds_this_run"] = time.perf_counter() - started
    report["torch_threads"] = torch.get_num_threads()
    report_path.write_text(json.dumps(report, indent=1))
    os.replace(tmp, final)  # the folder appears complete or not at all
    print(f"[standin] ready: {final}", flush=True)
    return final


def wait_for_standin(folder: Path, timeout_s: float = 3600.0, poll_s: float = 10.0) -> Path:
    """Block until another process has finished building `folder` (a shared file system is assumed)."""
    deadline = time.monotonic() + timeout_s
    while not (folder / "model_index.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for rank 0 to build the stand-in at {folder}; build it once before "
                "launching (python -m experiments.standin) or put DGFT_CACHE on a shared file system"
            )
        time.sleep(poll_s)
    return folder


def resolve_pretrained(value: str | None) -> str | None:
    """`standin:sd2` -> the built stand-in folder (building it on first use); other values unchanged."""
    if not isinstance(value, str) or not value.startswith(STANDIN_SCHEME):
        return value
    name = value[len(STANDIN_SCHEME) :]
    if name != "sd2":
        raise ValueError(f"unknown stand-in {value!r}; available: 'standin:sd2' (Stable Diffusion 2 layout)")
    folder = standin_dir() / "sd2"
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    if rank not in (None, "0"):
        return str(wait_for_standin(folder))  # multi-process launches: global rank 0 builds, the others wait
    if not (folder / "model_index.json").is_file():
        # A build inside another CLI's parsing must not move that run's random state (seed_everything ran).
        states = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            folder = build_standin()
        random.setstate(states[0])
        np.random.set_state(states[1])
    return str(folder)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.standin", description=__doc__.splitlines()[0],
        epilog="Unknown arguments go to both stages' CLI (they change the cache key), e.g. --trainer.max_steps=50.",
    )  # fmt: skip
    parser.add_argument("--rebuild", action="store_true", help="delete this setting's cache entry and build anew")
    parser.add_argument("--samples", type=Path, default=None, help="also write a PNG grid of 8 prior samples here")
    parser.add_argument(
        "--reconstructions",
        type=Path,
        default=None,
        help="also write a PNG of held-out RGB / depth / normals and their reconstructions here",
    )
    return parser.parse_known_args(argv)


def sample_grid(folder: Path, out: Path, height: int = 96, width: int = 128, steps: int = 20, seed: int = 0) -> Path:
    """8 samples of the image prior through stock `StableDiffusionPipeline` (empty prompt, no guidance), 2 x 4."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    images = pipe([""] * 8, height=height, width=width, num_inference_steps=steps, guidance_scale=1.0,
                  generator=generator, output_type="np").images  # fmt: skip
    rows = [np.concatenate(list(images[i : i + 4]), axis=1) for i in (0, 4)]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save(out)
    return out


def reconstruction_grid(folder: Path, out: Path, count: int = 4) -> Path:
    """Held-out rooms (the stand-in's validation split): RGB, depth and normals, each next to its reconstruction."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from datamodules.datamodule import ShardDataModule
    from datamodules.synthetic import SyntheticSpec

    config = yaml.safe_load((CONFIG_DIR / "data.yaml").read_text())["data"]["init_args"]
    datamodule = ShardDataModule(synthetic=SyntheticSpec(**config["synthetic"]), val_batch_size=count, num_workers=0)
    batch = next(iter(datamodule.val_dataloader()))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    panels = []
    with torch.no_grad():
        for image in (batch["rgb"], batch["depth_norm"].expand(-1, 3, -1, -1), batch["normals"]):
            recon = vae.decode(vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1)
            panels.append(torch.cat([image, recon], dim=3))  # original | reconstruction
    grid = torch.cat([torch.cat(list(p), dim=1) for p in panels], dim=2)  # rows = rooms, columns = kinds
    array = ((grid.permute(1, 2, 0).numpy() + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    args, overrides = parse_args(argv)
    folder = build_standin(overrides, rebuild=args.rebuild)
    if args.samples is not None:
        print(f"samples: {sample_grid(folder, args.samples)}")
    if args.reconstructions is not None:
        print(f"reconstructions: {reconstruction_grid(folder, args.reconstructions)}")
    report = folder.parent / REPORT
    if report.is_file():
        print(report.read_text())
    print(folder)
    return folder


if __name__ == "__main__":
    main()
