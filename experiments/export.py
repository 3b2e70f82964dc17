"""`python -m experiments.export --config RUN.yaml --ckpt_path CKPT --out FOLDER`: checkpoint -> diffusers folder.

The model is built from the run's config through the project CLI (nothing is run), the checkpoint's weights are
loaded (the frozen VAE, absent from checkpoints, comes from the config's source) and the result is written as a
folder that stock `diffusers.MarigoldDepthPipeline` (depth) or `MarigoldNormalsPipeline` (normals) loads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import yaml

from experiments.__main__ import main as cli_main
from experiments.config_defaults import expand_config_defaults
from lightning_modules.export import export_to_diffusers, pipeline_class

# Keys of a saved `fit` config that the subcommand-less CLI rejects or that export does not need.
DROPPED_KEYS = ("ckpt_path", "weights_only", "data", "defaults")

# Export needs only the model: no data, no logger, one CPU process whatever the run was trained on.
CLI_OVERRIDES = [
    "--data=lightning.pytorch.LightningDataModule",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="run config (repeatable, as for fit)")
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
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty: choose another --out or pass --overwrite")
    return args


def build_model(configs: list[str], ckpt_path: Path) -> torch.nn.Module:
    """Instantiate the configured model and load the checkpoint's weights into it."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (expected a Lightning .ckpt file)")
    expanded = expand_config_defaults([arg for config in configs for arg in ("--config", config)])
    with tempfile.TemporaryDirectory() as tmp:
        cli_args = []
        for i, config in enumerate(expanded[1::2]):
            content = yaml.safe_load(Path(config).read_text()) or {}
            for key in DROPPED_KEYS:
                content.pop(key, None)
            (Path(tmp) / f"{i}.yaml").write_text(yaml.safe_dump(content))
            cli_args += ["--config", str(Path(tmp) / f"{i}.yaml")]
        # LightningCLI warns when given args while sys.argv holds this command's own flags.
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            model = cli_main([*cli_args, *CLI_OVERRIDES], run=False).model
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} has no 'state_dict': not a Lightning checkpoint")
    model.on_load_checkpoint(checkpoint)  # fills in the frozen VAE weights checkpoints leave out
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> Path:
    """Export and print where the folder was written, with a usage line."""
    args = parse_args(argv)
    model = build_model(args.config, args.ckpt_path)
    folder = export_to_diffusers(
        model,
        args.out,
        processing_resolution=args.processing_resolution,
        denoising_steps=args.denoising_steps,
        tokenizer_source=args.tokenizer_source,
        set_alpha_to_one=args.set_alpha_to_one == "true",
        overwrite=args.overwrite,
    )
    name = pipeline_class(model.task.name).__name__
    shape = "[1,H,W,1] in [0,1]" if model.task.name == "depth" else "[1,H,W,3] unit normals, x left, y up, z out"
    print(f"exported {name} to {folder.resolve()}")
    print(f'usage: from diffusers import {name}; prediction = {name}.from_pretrained("{folder}")(image).prediction  # {shape}')
    return folder


if __name__ == "__main__":
    main()
