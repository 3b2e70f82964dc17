"""`python -m experiments.infer --model MODEL --input IMAGES --output FOLDER`: depth or normals for images on disk.

MODEL is a diffusers folder (model_index.json or unet/), a Lightning checkpoint with the run's `--config`, or a
Lightning checkpoint alone (it carries the module's hyperparameters). Each image is processed on its own at
`--processing_resolution` and written next to its relative path under FOLDER (docs/method.md §5.6 conventions).
Unreadable files are reported and skipped; the exit status is 0 if at least one image was written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from experiments.checkpoints import load_trained_model
from lightning_modules.image_io import read_image
from lightning_modules.inference import InferenceSpec
from lightning_modules.module import GeometryEstimator
from lightning_modules.predictor import predict
from lightning_modules.tasks import TASKS, task_of_folder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="diffusers folder or Lightning .ckpt")
    parser.add_argument("--config", action="append", default=[], help="run config(s) the .ckpt was trained with")
    parser.add_argument("--task", choices=sorted(TASKS), default=None, help="for diffusers folders")
    parser.add_argument("--input", required=True, type=Path, help="image file or folder (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the predictions")
    parser.add_argument(
        "--processing_resolution", type=int, default=None,
        help="longer edge while predicting, 0 = native (default: the folder's default, else 768)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--spacing", choices=["trailing", "leading", "linspace"], default=None)
    parser.add_argument(
        "--init", choices=["zeros", "gaussian", "pyramid"], default=None,
        help="initial latent (default: the model's; zeros for E2E models, gaussian for Marigold diffusion models)",
    )  # fmt: skip
    parser.add_argument("--ensemble", type=int, default=1, help="members per image (needs a stochastic --init)")
    parser.add_argument("--seed", type=int, default=None, help="seed of member 0 (member k uses seed + k)")
    parser.add_argument(
        "--batch_size", type=int, default=1,
        help="images per UNet batch in predict(); images are read one at a time, so 1 image per batch here",
    )  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if not args.model.exists():
        parser.error(f"model {args.model} does not exist")
    if not args.input.exists():
        parser.error(f"input {args.input} does not exist")
    for config in args.config:
        if not Path(config).is_file():
            parser.error(f"config {config} does not exist")
    if args.ensemble < 1 or args.batch_size < 1:
        parser.error("--ensemble and --batch_size must be >= 1")
    return args


def folder_index(folder: Path) -> dict[str, Any]:
    """The diffusers folder's model_index.json ({} if absent)."""
    index = folder / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def load_model(args: argparse.Namespace) -> tuple[GeometryEstimator, dict[str, Any]]:
    """The model and the folder's model_index.json ({} for checkpoints)."""
    if is_diffusers_folder(args.model):
        if args.config:
            raise ValueError("--config applies to .ckpt files, not to diffusers folders")
        index = folder_index(args.model)
        return GeometryEstimator(pretrained=str(args.model), task=task_of_folder(index, args.task)), index
    if not args.model.is_file():
        raise ValueError(f"{args.model} is neither a diffusers folder (model_index.json or unet/) nor a checkpoint")
    model = load_trained_model(args.model, args.config)
    if args.task and args.task != model.task.name:
        raise ValueError(f"--task {args.task} contradicts the checkpoint's task {model.task.name!r}")
    return model, {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def resolve_spec(model: GeometryEstimator, args: argparse.Namespace, index: dict[str, Any]) -> InferenceSpec:
    """Command-line values over the folder's defaults over the model's own inference spec."""
    spec = model.inference
    steps = args.steps if args.steps is not None else index.get("default_denoising_steps") or spec.num_steps
    return dataclasses.replace(
        spec,
        num_steps=steps,
        spacing=args.spacing or spec.spacing,
        init_latent=args.init or spec.init_latent,
        seed=args.seed if args.seed is not None else spec.seed,
    )


def list_images(root: Path) -> list[tuple[Path, Path]]:
    """(file, output stem relative to the output folder) for every image, sorted by relative path."""
    if root.is_file():
        return [(root, Path(root.stem))]
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    stems = [p.relative_to(root).with_suffix("") for p in files]
    # a.png and a.jpg in one folder would overwrite each other's outputs: keep their extensions then.
    clashes = {s for s in stems if stems.count(s) > 1}
    return [(p, s.with_name(f"{s.name}_{p.suffix[1:].lower()}") if s in clashes else s) for p, s in zip(files, stems)]


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 if at least one image was written)."""
    args = parse_args(argv)
    images = list_images(args.input)
    if not images:
        print(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {args.input}", file=sys.stderr)
        return 1
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        model, index = load_model(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: could not load model {args.model}: {error}", file=sys.stderr)
        return 1
    model = model.to(device).eval()
    load_seconds = time.perf_counter() - start
    spec = resolve_spec(model, args, index)
    resolution = args.processing_resolution
    if resolution is None:
        resolution = index.get("default_processing_resolution") or 768
    task = model.task.name
    print(
        f"{task} model {args.model} on {device}: {spec}, processing_resolution={resolution}, "
        f"ensemble={args.ensemble}, bf16={args.bf16}"
    )

    written, skipped, unet_calls = 0, [], 0
    start = time.perf_counter()
    for path, stem in tqdm(images, desc="images", unit="img"):
        try:
            rgb = read_image(path)
        except Exception as error:  # any decoder failure means the same thing: this file cannot be used
            skipped.append((path, f"unreadable: {error}"))
            tqdm.write(f"warning: skipping {path}: unreadable: {error}", file=sys.stderr)
            continue
        try:
            result = predict(
                model.core, model.task, rgb[None], resolution, args.ensemble, spec, args.batch_size,
                ensemble_options=model.task.ensemble_options(model.evaluation), bf16=args.bf16,
            )  # fmt: skip
            uncertainty = result["uncertainty"]
            model.task.write_outputs(
                args.output / stem, result[task][0].cpu(), uncertainty[0].cpu() if uncertainty is not None else None
            )
        except (RuntimeError, OSError, ValueError) as error:  # e.g. out of memory on one huge image, disk full
            skipped.append((path, f"failed: {type(error).__name__}: {error}"))
            tqdm.write(f"warning: skipping {path}: {error}", file=sys.stderr)
            continue
        written += 1
        unet_calls += result["unet_calls"]
    seconds = time.perf_counter() - start

    print(f"wrote {written} of {len(images)} images to {args.output} ({task}), skipped {len(skipped)}")
    per_image = f"{seconds / written:.3f} s/image" if written else "n/a"
    print(f"UNet calls: {unet_calls}; time: {per_image} (model load {load_seconds:.1f} s)")
    if skipped:
        print("skipped:")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
