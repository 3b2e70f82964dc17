"""`python -m experiments.infer --model MODEL --input IMAGES --output FOLDER`: depth or normals for images on disk.

MODEL is a diffusers folder (model_index.json or unet/), a Lightning checkpoint with the run's `--config`, or a
Lightning checkpoint alone (it carries the module's hyperparameters). Each image is predicted at
`--processing_resolution` and written next to its relative path under FOLDER (docs/method.md §5.6 conventions).

Speed (experiments/infer_pipeline.py): `--workers` processes decode images ahead of the model, in input order;
up to `--batch_size` consecutive images of one size go through the model together; files are written by
background threads (as many as workers, at least one) while the next batch is predicted.

Reliability: options and the output folder are checked before the model is loaded; every file is written under a
temporary name and renamed when complete; a rerun skips images whose files are all there (`--overwrite` redoes
them); Ctrl-C stops with exit status 130 and a count of what was written (predictions already queued for writing
are written first; a second Ctrl-C drops them). Unreadable files are reported and skipped;
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from experiments.checkpoints import load_trained_model
from experiments.infer_pipeline import Decoded, ImageReader, OutputWriter, default_workers, equal_size_batches
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
        help="consecutive images of one size predicted together (default 1; more uses more memory)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=default_workers(),
        help="processes decoding images ahead of the model, and threads writing the outputs (default: "
        "min(4, CPUs - 1), here %(default)s; 0 = read in the main process, write in one thread)",
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
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (0 = read in the main process), got {args.workers}")
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
        f"ensemble={args.ensemble}, bf16={args.bf16}, batch_size={args.batch_size}, workers={args.workers}"
    )
    from_folder = _folder_settings_used(args, folder)
    if from_folder:
        print(f"from the folder's model_index.json / scheduler_config.json: {', '.join(from_folder)}")

    with_uncertainty = args.ensemble > 1
    if task.output_files(args.output, with_uncertainty) is None and not args.overwrite:
        print(f"note: task {task.name!r} does not list its output files (Task.output_files): every image is redone")
    todo = []
    for path, stem in images:
        expected = task.output_files(args.output / stem, with_uncertainty)
        if args.overwrite or not expected or not all(p.is_file() for p in expected):
            todo.append((path, stem))
    done = len(images) - len(todo)

    skipped: list[tuple[int, Path, str]] = []  # (position in todo, path, reason); appended by the writer too

    def skip(index: int, reason: str, message: str) -> None:
        skipped.append((index, todo[index][0], reason))
        tqdm.write(f"warning: skipping {todo[index][0]}: {message}", file=sys.stderr)

    def written(index: int) -> None:
        progress.written += 1

    def write_failed(index: int, error: BaseException) -> None:
        skip(index, f"failed: {type(error).__name__}: {error}", f"cannot write its outputs: {error}")

    def predict_batch(images: Tensor) -> dict[str, Any]:
        return predict(
            model.core, task, images, resolution, args.ensemble, spec, args.batch_size,
            ensemble_options=task.ensemble_options(model.evaluation), bf16=args.bf16,
        )  # fmt: skip

    unet_calls = 0
    start = time.perf_counter()
    # The workers are forked before any other thread of this process starts (the writer's, the progress bar's).
    reader = ImageReader(
        [path for path, _ in todo], args.workers, prefetch=2 * args.batch_size, pin_memory=device.type == "cuda",
        warn=lambda message: tqdm.write(message, file=sys.stderr),
    )  # fmt: skip
    writer = None
    try:
        writer = OutputWriter(
            lambda stem, prediction, uncertainty: task.write_outputs(args.output / stem, prediction, uncertainty),
            capacity=max(2, 2 * args.batch_size), written=written, failed=write_failed, threads=max(1, args.workers),
        )  # fmt: skip
        with tqdm(total=len(todo), desc="images", unit="img") as bar:  # closed on Ctrl-C too

            def unreadable(index: int, reason: str) -> None:
                skip(index, reason, reason)
                bar.update()

            def failed(index: int, error: BaseException) -> None:  # e.g. out of memory on one huge image
                skip(index, f"failed: {type(error).__name__}: {error}", str(error))
                bar.update()

            batches = equal_size_batches(reader, args.batch_size, unreadable)
            for group, result in _predictions(batches, predict_batch, device, failed):
                unet_calls += result["unet_calls"]
                predictions = result[task.name].cpu()
                uncertainty = result["uncertainty"]
                uncertainty = uncertainty.cpu() if uncertainty is not None else None
                for j, item in enumerate(group):
                    uncertainty_j = uncertainty[j] if uncertainty is not None else None
                    writer.put(item.index, todo[item.index][1], predictions[j], uncertainty_j)
                bar.update(len(group))
    finally:
        try:
            reader.close()
        finally:
            if writer is not None:
                writer.close()  # every queued prediction is written, on Ctrl-C too (a second one drops them)
    written_count = progress.written
    seconds = time.perf_counter() - start

    parts = []
    if done:
        parts.append(f"{done} already done (--overwrite redoes them)")
    if skipped:
        parts.append(f"{len(skipped)} unreadable or failed")
    detail = f": {', '.join(parts)}" if parts else ""
    print(
        f"wrote {written_count} of {len(images)} images to {args.output} ({task.name}), "
        f"skipped {done + len(skipped)}{detail}"
    )
    per_image = (
        f"{seconds / written_count:.3f} s/image, {written_count / seconds:.2f} images/s" if written_count else "n/a"
    )
    print(f"UNet calls: {unet_calls}; time: {per_image} (model load {load_seconds:.1f} s)")
    if skipped:
        print("skipped:")
        for _, path, reason in sorted(skipped, key=lambda entry: entry[0]):
            print(f"  {path}: {reason}")
    return 0 if written_count + done else 1


PREDICT_ERRORS = (RuntimeError, OSError, ValueError)  # out of memory, say: that image fails, the run goes on


def _predictions(
    batches: Iterable[list[Decoded]],
    predict_batch: Callable[[Tensor], dict[str, Any]],
    device: torch.device,
    failed: Callable[[int, BaseException], None],
) -> Iterator[tuple[list[Decoded], dict[str, Any]]]:
    """(images, their `predict` result) per batch; a batch that fails is retried one image at a time (its images
    alone may fit in memory), and an image that fails alone goes to `failed(index, error)`."""
    for batch in batches:
        groups = [batch]
        while groups:
            group = groups.pop(0)
            rgb = torch.stack([item.image.to(device, non_blocking=True) for item in group])
            try:
                result = predict_batch(rgb)
            except PREDICT_ERRORS as error:
                if len(group) == 1:
                    failed(group[0].index, error)
                    continue
                tqdm.write(
                    f"warning: a batch of {len(group)} images failed ({type(error).__name__}: {error}); predicting "
                    "them one at a time", file=sys.stderr,
                )  # fmt: skip
                groups = [[item] for item in group] + groups
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            yield group, result


if __name__ == "__main__":
    sys.exit(main())
