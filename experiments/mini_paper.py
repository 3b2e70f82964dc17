"""The paper's findings in miniature, from the SD2 stand-in: `python -m experiments.mini_paper` (docs/mini_paper.md).

1. Marigold-style diffusion training from the stand-in (`configs/mini_paper/marigold_diffusion.yaml`), exported as a
   stock `MarigoldDepthPipeline` folder.
2. E2E FT from that folder ("Marigold + E2E FT") and straight from the SD2-layout stand-in ("SD2 + E2E FT"), with
   equal steps, data and settings.
3. One table: the Marigold stand-in with leading x 1, trailing x 1, trailing x 4 and 10 steps x 10 members (Gaussian
   initial latents, leading spacing: the published Marigold protocol), then both E2E models (1 trailing step, zero
   latent). Columns: AbsRel / delta1 on the synthetic validation rooms, UNet calls and ms per image (timed
   `predictor.predict` on those rooms), AbsRel / delta1 on Middlebury 2014 "Motorcycle" (a real photograph with
   stereo ground truth, evaluated by `trainer.test` through `configs/eval/middlebury.yaml`'s protocol).
   Written to `results/mini_paper.{csv,md,json}` and between the README's mini-paper markers.

Every run logs under `runs/mini_paper/<run>/fit`, so `tensorboard --logdir runs/mini_paper` overlays the curves and
`python -m experiments.compare runs/mini_paper` prints them side by side. Finished stages are reused: a stage whose
`done.json` records the same arguments is skipped (`--fresh` redoes all). `--quick` runs a tiny setting (tests).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mini_paper"
MIDDLEBURY_CONFIG = ROOT / "configs" / "eval" / "middlebury.yaml"
README_START, README_END = "<!-- mini-paper:start -->", "<!-- mini-paper:end -->"
COLUMNS = (
    "model", "spacing", "steps", "ensemble", "init", "unet_calls", "ms_per_image",
    "synthetic_abs_rel", "synthetic_delta1", "middlebury_abs_rel", "middlebury_delta1",
)  # fmt: skip

# Overrides of the tiny setting (`--quick`): tiny data and a few steps for every fit, the stand-in included.
QUICK_DATA = [
    "--data.init_args.synthetic.num_train=16", "--data.init_args.synthetic.num_val=4",
    "--data.init_args.synthetic.height=32", "--data.init_args.synthetic.width=48",
    "--data.init_args.synthetic.samples_per_shard=4", "--data.init_args.batch_size=2",
]  # fmt: skip
QUICK_STEPS = ["--trainer.max_steps=3", "--trainer.val_check_interval=3"]


@dataclasses.dataclass
class Row:
    """One line of the table: which model, how it predicts."""

    model: str
    run: str
    spacing: str
    steps: int
    ensemble: int
    init: str


ROWS = (
    Row("Marigold stand-in", "marigold_diffusion", "leading", 1, 1, "gaussian"),
    Row("Marigold stand-in", "marigold_diffusion", "trailing", 1, 1, "gaussian"),
    Row("Marigold stand-in", "marigold_diffusion", "trailing", 4, 1, "gaussian"),
    Row("Marigold stand-in", "marigold_diffusion", "leading", 10, 10, "gaussian"),
    Row("Marigold + E2E FT", "e2e_from_marigold", "trailing", 1, 1, "zeros"),
    Row("SD2 + E2E FT", "e2e_from_sd2", "trailing", 1, 1, "zeros"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.mini_paper", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/mini_paper"), help="TensorBoard root of all runs")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder for mini_paper.{csv,md,json}")
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="README whose table is replaced")
    parser.add_argument("--no-readme", dest="readme", action="store_const", const=None, help="leave the README")
    parser.add_argument("--images", type=int, default=32, help="synthetic validation images scored and timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (median)")
    parser.add_argument("--quick", action="store_true", help="tiny data and 3 steps per stage (a smoke test)")
    parser.add_argument("--fresh", action="store_true", help="redo every stage, ignoring finished ones")
    parser.add_argument("--seed", type=int, default=2024, help="seed_everything of every fit")
    return parser.parse_args(argv)


def _done(folder: Path, arguments: list[str]) -> bool:
    marker = folder / "done.json"
    return marker.is_file() and json.loads(marker.read_text()).get("arguments") == arguments


def _mark_done(folder: Path, arguments: list[str], **extra: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").write_text(json.dumps({"arguments": arguments, **extra}, indent=1))


def fit_stage(name: str, args: argparse.Namespace, extra: list[str]) -> tuple[Path, float]:
    """Fit `configs/mini_paper/<name>.yaml` into `<runs>/<name>/fit` unless done; (last checkpoint, seconds)."""
    from experiments.__main__ import main as cli_main

    folder = args.runs / name / "fit"
    arguments = [
        "fit", "--config", str(CONFIGS / f"{name}.yaml"),
        f"--trainer.logger.init_args.save_dir={args.runs}", f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=fit", f"--seed_everything={args.seed}",
        *(QUICK_DATA + QUICK_STEPS if args.quick else []), *extra,
    ]  # fmt: skip
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not args.fresh and _done(folder, arguments) and checkpoint.is_file():
        seconds = json.loads((folder / "done.json").read_text())["seconds"]
        print(f"[mini_paper] {name}: reusing {checkpoint} ({seconds / 60:.1f} min when trained)", flush=True)
        return checkpoint, seconds
    if folder.exists():  # an interrupted run, or one of other arguments: keep it aside, start clean
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(folder, aside)
        print(f"[mini_paper] {name}: earlier run folder moved to {aside}", flush=True)
    print(f"[mini_paper] {name}: training", flush=True)
    started = time.perf_counter()
    cli = cli_main(arguments)
    seconds = time.perf_counter() - started
    found = Path(cli.trainer.checkpoint_callback.last_model_path)
    if not found.is_file():
        raise RuntimeError(f"{name}: training wrote no last checkpoint (expected under {folder})")
    _mark_done(folder, arguments, seconds=seconds)
    return found, seconds


def export_marigold(checkpoint: Path, out: Path) -> Path:
    """The diffusion-trained model as a stock MarigoldDepthPipeline folder (replaced whole, atomically)."""
    from lightning_modules.export import export_to_diffusers
    from lightning_modules.module import GeometryEstimator

    model = GeometryEstimator.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    return export_to_diffusers(
        model.core, model.task, out, processing_resolution=128, denoising_steps=1,
        tokenizer_source=model.hparams.get("pretrained"), set_alpha_to_one=False, overwrite=True,
    )  # fmt: skip


def middlebury_datamodule(shard_dir: Path):
    """The Middlebury shard (written from scikit-image if missing) and the protocol of configs/eval/middlebury.yaml."""
    from datamodules.datamodule import ShardDataModule
    from datamodules.middlebury import write_middlebury_shard
    from lightning_modules.evaluation import EvalSpec

    shard = write_middlebury_shard(shard_dir)
    config = yaml.safe_load(MIDDLEBURY_CONFIG.read_text())
    spec = EvalSpec(**config["model"]["init_args"]["evaluation"])
    data = dict(config["data"]["init_args"], shard_root=None, test_shards=[str(shard)])
    return ShardDataModule(**data), spec


def evaluate_row(model, row: Row, synthetic: dict, middlebury, args: argparse.Namespace) -> dict[str, Any]:
    """Score and time one setting on the synthetic rooms, then run `trainer.test` on Middlebury with it."""
    import lightning as L

    from experiments.benchmark_inference import run_row
    from lightning_modules.inference import InferenceSpec
    from lightning_modules.predictor import predict

    spec = InferenceSpec(num_steps=row.steps, spacing=row.spacing, init_latent=row.init, seed=1234)
    predict(
        model.core, model.task, synthetic["rgb"][:1], processing_resolution=0, ensemble_size=row.ensemble, spec=spec
    )
    timing = run_row(model, synthetic, spec, row.ensemble, argparse.Namespace(repeats=args.repeats, batch_size=16))
    datamodule, eval_spec = middlebury
    model.inference = spec
    model.evaluation = dataclasses.replace(eval_spec, ensemble_size=row.ensemble)
    model.configure_metrics()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(args.runs / "middlebury" / row.run), enable_checkpointing=False,
    )  # fmt: skip
    (scores,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {
        "model": row.model, "spacing": row.spacing, "steps": row.steps, "ensemble": row.ensemble, "init": row.init,
        "unet_calls": timing["unet_calls"], "ms_per_image": timing["ms_per_image"],
        "synthetic_abs_rel": timing["abs_rel"], "synthetic_delta1": timing["delta1"],
        "middlebury_abs_rel": float(scores["test/abs_rel"]), "middlebury_delta1": float(scores["test/delta1"]),
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | inference | UNet calls / image | ms / image | synthetic AbsRel | synthetic delta1 "
        "| Middlebury AbsRel | Middlebury delta1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        inference = f"{r['spacing']}, {r['steps']} step{'s' if r['steps'] > 1 else ''} x {r['ensemble']}, {r['init']}"
        lines.append(
            f"| {r['model']} | {inference} | {r['unet_calls']} | {r['ms_per_image']:.1f} | {r['synthetic_abs_rel']:.3f} "
            f"| {r['synthetic_delta1']:.3f} | {r['middlebury_abs_rel']:.3f} | {r['middlebury_delta1']:.3f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import diffusers
    import lightning

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "torch": torch.__version__, "diffusers": diffusers.__version__, "lightning": lightning.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the mini-paper markers; False (and untouched) when the markers are missing."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(README_START)] + "\n" + block + "\n" + text[end:])
    return True


def write_results(rows: list[dict], meta: dict, args: argparse.Namespace) -> str:
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "mini_paper.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    minutes = {name: f"{s / 60:.1f}" for name, s in meta["stage_seconds"].items()}
    footer = (
        f"\nSeed {meta['seed']}; {meta['images']} synthetic validation rooms at {meta['size']}; machine: "
        f"{meta['machine']['processor']}, {meta['machine']['cpus']} CPUs, {meta['machine']['torch_threads']} torch "
        f"threads, GPU {meta['machine']['gpu'] or 'none'}; minutes per stage when it was trained: "
        f"{', '.join(f'{k} {v}' for k, v in minutes.items())}; evaluation {meta['eval_seconds'] / 60:.1f}; "
        f"this invocation {meta['wall_seconds'] / 60:.1f} (finished stages are reused); "
        f"`python -m experiments.mini_paper{' --quick' if args.quick else ''}`, {meta['date']}."
    )
    (args.results / "mini_paper.md").write_text(table + "\n" + footer + "\n")
    (args.results / "mini_paper.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return table + "\n" + footer


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from experiments.benchmark_inference import validation_images
    from experiments.standin import build_standin
    from lightning_modules.module import GeometryEstimator

    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    standin_overrides = QUICK_DATA + QUICK_STEPS if args.quick else []
    t0 = time.perf_counter()
    sd2 = build_standin(standin_overrides)
    stage_seconds["standin (this invocation)"] = time.perf_counter() - t0
    pretrained = [f"--model.init_args.pretrained={sd2}"]

    marigold_ckpt, stage_seconds["marigold_diffusion"] = fit_stage("marigold_diffusion", args, pretrained)
    marigold_dir = args.runs / "marigold_diffusion" / "exported"
    if args.fresh or not _done(marigold_dir, [str(marigold_ckpt)]):
        export_marigold(marigold_ckpt, marigold_dir)
        _mark_done(marigold_dir, [str(marigold_ckpt)])
    checkpoints = {"marigold_diffusion": marigold_ckpt}
    checkpoints["e2e_from_marigold"], stage_seconds["e2e_from_marigold"] = fit_stage(
        "e2e_from_marigold", args, [f"--model.init_args.pretrained={marigold_dir}"]
    )
    checkpoints["e2e_from_sd2"], stage_seconds["e2e_from_sd2"] = fit_stage("e2e_from_sd2", args, pretrained)

    print("[mini_paper] evaluating", flush=True)
    eval_started = time.perf_counter()
    # The validation rooms all three runs validated on (their configs share the data groups).
    data_overrides = [*pretrained, *(QUICK_DATA if args.quick else [])]
    synthetic = validation_images([str(CONFIGS / "e2e_from_sd2.yaml")], data_overrides, args.images)
    middlebury = middlebury_datamodule(args.runs / "middlebury" / "shards")
    rows, models = [], {}
    for row in ROWS:
        if row.run not in models:
            models[row.run] = GeometryEstimator.load_from_checkpoint(
                checkpoints[row.run], map_location="cpu", weights_only=False
            ).eval()
        torch.manual_seed(0)
        rows.append(evaluate_row(models[row.run], row, synthetic, middlebury, args))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    meta = {
        "seed": args.seed, "images": int(synthetic["rgb"].shape[0]),
        "size": "x".join(str(s) for s in synthetic["rgb"].shape[-2:]), "machine": machine(),
        "stage_seconds": stage_seconds, "eval_seconds": time.perf_counter() - eval_started,
        "wall_seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
    }  # fmt: skip
    block = write_results(rows, meta, args)
    print("\n" + block)
    if args.readme is not None and not args.quick:
        if not update_readme(args.readme, block):
            print(f"[mini_paper] {args.readme} has no {README_START} ... {README_END} markers: not updated")
    return rows


if __name__ == "__main__":
    main()
