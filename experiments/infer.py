"""`python -m experiments.infer --model MODEL --input IMAGES --output FOLDER`: depth or normals for images on disk.

MODEL is a diffusers folder (model_index.json or unet/), a Lightning checkpoint with the run's `--config`, or a
Lightning checkpoint alone (it carries the module's hyperparameters). Each image is processed on its own at
`--processing_resolution` and written next to its relative path under FOLDER (docs/method.md §5.6 conventions).

Reliability: options and the output folder are checked before the model is loaded; every file is written under a
temporary name and renamed when complete; a rerun skips images whose files are all there (`--overwrite` redoes
them); Ctrl-C stops with exit status 130 and a count of what was written. Unreadable files are reported and skipped;
the exit status is 0 if every image that could be read was written (or already done), 1 if none was.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import tempfile
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
from lightning_modules.tasks import TASKS, build_task, task_of_folder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPACINGS = ("trailing", "leading", "linspace")
VAE_FACTOR = 8  # every Stable Diffusion / Marigold VAE downsamples 8x; the stock pipelines require a multiple of it
ENSEMBLE_HINT = "use --init gaussian (or pyramid) for a meaningful ensemble"
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="diffusers folder or Lightning .ckpt")
    parser.add_argument("--config", action="append", default=[], help="run config(s) the .ckpt was trained with")
    parser.add_argument("--task", choices=sorted(TASKS), default=None, help="for diffusers folders")
    parser.add_argument("--input", required=True, type=Path, help="image file or folder (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the predictions")
    parser.add_argument(
        "--processing_resolution", type=int, default=None,
        help="longer edge while predicting, 0 = native, else a multiple of 8 (default: the folder's default, else 768)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the folder's, else the model's)")
    parser.add_argument(
        "--spacing", choices=SPACINGS, default=None,
        help="DDIM timestep spacing (default: the folder's scheduler timestep_spacing, else the model's)",
    )  # fmt: skip
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
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output files already exist")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything that needs no model: paths, numeric options, the output folder (created)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model.exists():
        parser.error(
            f"--model {args.model} does not exist (a diffusers folder with model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/ and scheduler/, or a Lightning .ckpt)"
        )
    if not args.input.exists():
        parser.error(f"--input {args.input} does not exist")
    for config in args.config:
        if not Path(config).is_file():
            parser.error(f"config {config} does not exist")
    resolution = args.processing_resolution
    if resolution is not None and resolution < 0:
        parser.error(f"--processing_resolution must be >= 0 (0 = native), got {resolution}")
    if resolution is not None and resolution % VAE_FACTOR:
        below = max(VAE_FACTOR, resolution // VAE_FACTOR * VAE_FACTOR)
        parser.error(
            f"--processing_resolution must be 0 (native) or a multiple of {VAE_FACTOR} (the VAE's downsampling "
            f"factor), got {resolution}; e.g. {below}"
        )
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.ensemble < 1:
        parser.error(f"--ensemble must be >= 1, got {args.ensemble}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.ensemble > 1 and args.init == "zeros":
        parser.error(f"--ensemble {args.ensemble} with --init zeros: every member would be identical; {ENSEMBLE_HINT}")
    problem = output_folder_problem(args.input, args.output)
    if problem:
        parser.error(problem)
    return args


def output_folder_problem(input_path: Path, output: Path) -> str | None:
    """Why `output` cannot be the output folder (None if it can); creates it (and its parents) if missing."""
    if output.exists() and not output.is_dir():
        return f"--output {output} is a file, not a folder: choose a folder"
    if input_path.is_dir() and output.resolve() == input_path.resolve():
        return (
            f"--output {output} is the --input folder: predictions would be mixed with the images (and read as "
            f"images by the next run); choose another folder, e.g. {output / 'predictions'}"
        )
    existing = next(p for p in (output.absolute(), *output.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"--output {output} cannot be created: {existing} is a file, not a folder"
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        return f"--output {output} is not a writable folder ({type(error).__name__}: {error.strerror or error})"
    return None


def folder_index(folder: Path) -> dict[str, Any]:
    """The diffusers folder's model_index.json ({} if absent)."""
    return _json_file(folder / "model_index.json")


def _json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return content


def folder_defaults(folder: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Inference settings a diffusers folder declares: `steps` and `processing_resolution` (model_index.json's
    `default_denoising_steps` and `default_processing_resolution`) and `spacing` (the scheduler's
    `timestep_spacing`), each only where the folder sets it."""
    defaults: dict[str, Any] = {}
    if index.get("default_denoising_steps") is not None:
        defaults["steps"] = int(index["default_denoising_steps"])
    if index.get("default_processing_resolution") is not None:
        defaults["processing_resolution"] = int(index["default_processing_resolution"])
    scheduler = _json_file(folder / "scheduler" / "scheduler_config.json")
    spacing = scheduler.get("timestep_spacing")
    if spacing is None and scheduler:  # as the stock pipeline would run it: the scheduler class's default
        spacing = _default_argument(scheduler.get("_class_name"), "timestep_spacing")
    if spacing in SPACINGS:
        defaults["spacing"] = spacing
    elif spacing is not None:
        print(f"warning: ignoring the folder's timestep_spacing {spacing!r} (supported: {', '.join(SPACINGS)})")
    return defaults


def _default_argument(class_name: Any, argument: str) -> Any:
    """The default of `argument` in diffusers' class `class_name` (None if unknown)."""
    import diffusers

    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if cls is None:
        return None
    parameter = inspect.signature(cls.__init__).parameters.get(argument)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def load_model(args: argparse.Namespace) -> tuple[GeometryEstimator, dict[str, Any]]:
    """The model and what its diffusers folder sets (defaults and task options; {} for checkpoints)."""
    if is_diffusers_folder(args.model):
        if args.config:
            raise ValueError("--config applies to .ckpt files, not to diffusers folders")
        index = folder_index(args.model)
        defaults = folder_defaults(args.model, index)
        task = task_of_folder(index, args.task)
        model = GeometryEstimator(pretrained=str(args.model), task=task)
        options = TASKS[task].folder_options(index) if index else {}
        if options:
            # decode as the folder's stock pipeline does (e.g. normals with use_full_z_range: false)
            model.task = build_task(task, **options)
            model.configure_metrics()
        return model, {**defaults, **options}
    if args.model.is_dir():
        raise ValueError(
            f"{args.model} is a folder but not a diffusers model folder (no model_index.json or unet/ in it); "
            "pass a diffusers folder or a Lightning .ckpt file"
        )
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


def resolve_spec(model: GeometryEstimator, args: argparse.Namespace, folder: dict[str, Any]) -> InferenceSpec:
    """Command-line values over the folder's defaults over the model's own inference spec."""
    spec = model.inference
    return dataclasses.replace(
        spec,
        num_steps=args.steps if args.steps is not None else folder.get("steps", spec.num_steps),
        spacing=args.spacing or folder.get("spacing", spec.spacing),
        init_latent=args.init or spec.init_latent,
        seed=args.seed if args.seed is not None else spec.seed,
    )


def _folder_settings_used(args: argparse.Namespace, folder: dict[str, Any]) -> list[str]:
    """`name=value` of the folder's settings this run uses (the command line overrides the rest)."""
    given = {"steps": args.steps, "processing_resolution": args.processing_resolution, "spacing": args.spacing}
    return [f"{k}={v}" for k, v in folder.items() if given.get(k) is None]


def list_images(root: Path, exclude: Path | None = None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, output stem relative to the output folder) for every image, sorted by relative path, and notes.

    Folders are searched recursively, following symbolic links to folders, except a link back to a folder above
    it (a loop: reported, not followed) and the `exclude` folder (the output, when it lies inside the input).
    Files with an image suffix are listed even if unreadable (a broken link, say): reading them fails and is
    reported per file.
    """
    if not root.is_dir():
        return [(root, Path(root.stem))], []
    notes: list[str] = []
    excluded = os.path.realpath(exclude) if exclude is not None else None
    files: list[Path] = []
    stack: list[tuple[Path, frozenset[str]]] = [(root, frozenset({os.path.realpath(root)}))]
    while stack:
        folder, chain = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            notes.append(f"warning: cannot list {folder} ({error.strerror or error}); its images are not read")
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows symbolic links
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(path)
                if real == excluded:
                    continue
                if real in chain:
                    notes.append(f"warning: {path} is a symbolic link loop (it leads back to {real}); not followed")
                    continue
                stack.append((path, chain | {real}))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    stems = [p.relative_to(root).with_suffix("") for p in files]
    # a.png and a.jpg in one folder would overwrite each other's outputs: keep their extensions then.
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    images = [
        (p, s.with_name(f"{s.name}_{p.suffix[1:].lower()}") if counts[s] > 1 else s) for p, s in zip(files, stems)
    ]
    return images, notes


def _output_inside_input(input_path: Path, output: Path) -> bool:
    return input_path.is_dir() and output.resolve().is_relative_to(input_path.resolve())


@dataclasses.dataclass
class Progress:
    """What a run has done so far, for the message when it is interrupted."""

    total: int = 0
    written: int = 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status: 0 if at least one image was written or already done, 1 if none,
    2 for an ensemble of identical members, 130 when interrupted (Ctrl-C). Option errors exit with status 2 before
    anything is loaded (argparse)."""
    args = parse_args(argv)
    progress = Progress()
    try:
        return run(args, progress)
    except KeyboardInterrupt:
        print(
            f"interrupted: wrote {progress.written} of {progress.total} images to {args.output} (every file there "
            "is complete; rerun the same command to continue: finished images are skipped)",
            file=sys.stderr,
        )
        return INTERRUPTED


def run(args: argparse.Namespace, progress: Progress) -> int:
    """The command after its arguments are checked; counts into `progress` as it goes."""
    exclude = args.output if _output_inside_input(args.input, args.output) else None
    images, notes = list_images(args.input, exclude)
    progress.total = len(images)
    if exclude is not None:
        print(f"note: --output {args.output} is inside --input {args.input}: files under it are not read as input")
    for note in notes:
        print(note, file=sys.stderr)
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
        model, folder = load_model(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: could not load model {args.model}: {error}", file=sys.stderr)
        return 1
    model = model.to(device).eval()
    load_seconds = time.perf_counter() - start
    spec = resolve_spec(model, args, folder)
    if args.ensemble > 1 and spec.init_latent == "zeros":
        print(
            f"error: --ensemble {args.ensemble} with this model's initial latent 'zeros' (deterministic): every "
            f"member would be identical; {ENSEMBLE_HINT}",
            file=sys.stderr,
        )
        return 2
    resolution = args.processing_resolution
    if resolution is None:
        resolution = folder.get("processing_resolution", 768)
    task = model.task
    print(
        f"{task.name} model {args.model} on {device}: {spec}, processing_resolution={resolution}, "
        f"ensemble={args.ensemble}, bf16={args.bf16}"
    )
    from_folder = _folder_settings_used(args, folder)
    if from_folder:
        print(f"from the folder's model_index.json / scheduler_config.json: {', '.join(from_folder)}")

    with_uncertainty = args.ensemble > 1
    if task.output_files(args.output, with_uncertainty) is None and not args.overwrite:
        print(f"note: task {task.name!r} does not list its output files (Task.output_files): every image is redone")
    skipped, done, unet_calls = [], 0, 0
    start = time.perf_counter()
    with tqdm(images, desc="images", unit="img") as bar:  # closed on Ctrl-C too
        for path, stem in bar:
            expected = task.output_files(args.output / stem, with_uncertainty)
            if not args.overwrite and expected and all(p.is_file() for p in expected):
                done += 1
                continue
            try:
                rgb = read_image(path)
            except Exception as error:  # any decoder failure means the same thing: this file cannot be used
                skipped.append((path, f"unreadable: {error}"))
                tqdm.write(f"warning: skipping {path}: unreadable: {error}", file=sys.stderr)
                continue
            try:
                result = predict(
                    model.core, task, rgb[None], resolution, args.ensemble, spec, args.batch_size,
                    ensemble_options=task.ensemble_options(model.evaluation), bf16=args.bf16,
                )  # fmt: skip
                uncertainty = result["uncertainty"]
                task.write_outputs(
                    args.output / stem,
                    result[task.name][0].cpu(),
                    uncertainty[0].cpu() if uncertainty is not None else None,
                )
            except (RuntimeError, OSError, ValueError) as error:  # e.g. out of memory on one huge image, disk full
                skipped.append((path, f"failed: {type(error).__name__}: {error}"))
                tqdm.write(f"warning: skipping {path}: {error}", file=sys.stderr)
                continue
            progress.written += 1
            unet_calls += result["unet_calls"]
    written = progress.written
    seconds = time.perf_counter() - start

    parts = []
    if done:
        parts.append(f"{done} already done (--overwrite redoes them)")
    if skipped:
        parts.append(f"{len(skipped)} unreadable or failed")
    detail = f": {', '.join(parts)}" if parts else ""
    print(
        f"wrote {written} of {len(images)} images to {args.output} ({task.name}), skipped {done + len(skipped)}{detail}"
    )
    per_image = f"{seconds / written:.3f} s/image" if written else "n/a"
    print(f"UNet calls: {unet_calls}; time: {per_image} (model load {load_seconds:.1f} s)")
    if skipped:
        print("skipped:")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    return 0 if written + done else 1


if __name__ == "__main__":
    sys.exit(main())
