"""`python -m experiments.export --ckpt_path CKPT --out FOLDER [--config RUN.yaml]`: checkpoint -> diffusers folder.

The model is rebuilt from the checkpoint's own hyperparameters (the frozen VAE, absent from checkpoints, comes from
their `pretrained` source); a `--config` given too must describe the same model (experiments.checkpoints). The
result is the task's stock diffusers pipeline folder (`MarigoldDepthPipeline` for depth, `MarigoldNormalsPipeline`
for normals).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.checkpoints import load_trained_model
from lightning_modules.export import export_to_diffusers, pipeline_class


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", action="append", default=[], help="the run's config (repeatable): checked against the checkpoint"
    )
    parser.add_argument("--ckpt_path", required=True, type=Path, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the diffusers pipeline into")
    parser.add_argument("--processing_resolution", type=int, default=768, help="pipeline default (0 = native)")
    parser.add_argument("--denoising_steps", type=int, default=1, help="pipeline default number of DDIM steps")
    parser.add_argument("--tokenizer_source", default=None, help="folder/hub id with text_encoder/ and tokenizer/")
    parser.add_argument(
        "--set_alpha_to_one",
        choices=["true", "false"],
        default="true",
        help="true: the pipeline's last step returns x0 like predict_image; false: as published Marigold folders",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = parser.parse_args(argv)
    for config in args.config:
        if not Path(config).is_file():
            parser.error(f"config {config} does not exist")
    if not args.ckpt_path.is_file():
        parser.error(f"checkpoint {args.ckpt_path} does not exist (expected a Lightning .ckpt file)")
    if args.processing_resolution < 0 or args.processing_resolution % 8:
        parser.error(
            f"--processing_resolution must be 0 (native) or a positive multiple of 8, got {args.processing_resolution}"
        )
    if args.denoising_steps < 1:
        parser.error(f"--denoising_steps must be >= 1, got {args.denoising_steps}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder: choose a folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty: choose another --out or pass --overwrite")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Export and print where the folder was written, with a usage line.

    A user error (checkpoint, config, text source) ends with `error: ...` (exit status 1), Ctrl-C with exit status
    130; neither leaves anything under --out (the folder is renamed into place only when complete).
    """
    args = parse_args(argv)
    try:
        model = load_trained_model(args.ckpt_path, args.config)
        hparams = model.hparams
        folder = export_to_diffusers(
            model.core,
            model.task,
            args.out,
            processing_resolution=args.processing_resolution,
            denoising_steps=args.denoising_steps,
            tokenizer_source=args.tokenizer_source or hparams.get("pretrained"),
            tiny=hparams.get("tiny"),
            set_alpha_to_one=args.set_alpha_to_one == "true",
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as error:  # FileNotFoundError and FileExistsError included
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        raise SystemExit(130) from None
    name = pipeline_class(model.task).__name__
    print(f"exported {name} to {folder.resolve()}")
    print(
        f'usage: from diffusers import {name}; prediction = {name}.from_pretrained("{folder}")(image).prediction  # {model.task.pipeline_output}'
    )
    return folder


if __name__ == "__main__":
    main()
