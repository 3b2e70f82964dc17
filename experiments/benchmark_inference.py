"""The scheduler finding, measured: DDIM spacing x steps x ensemble size -> UNet calls, time, AbsRel, docs/method.md §5.

    python -m experiments.benchmark_inference [--ckpt_path runs/demo_e2e/fit/checkpoints/last.ckpt]
        [--config configs/demo.yaml] [--images 16] [--out results/benchmark_inference]

Runs the one inference path (`lightning_modules.predictor.predict`) on the first validation images of the run's
data at native resolution, for every spacing x steps x ensemble combination, and prints a Markdown table:
UNet calls per image, wall time per image (median of `--repeats` timed passes after one warm-up pass), and
validation AbsRel / delta1 after per-image least-squares alignment. Ensembles of K > 1 need stochastic initial
latents, so every row uses `--init` (default gaussian, Marigold's protocol) with member seeds seed + k.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.__main__ import main as cli_main
from lightning_modules.evaluation import EvalSpec
from lightning_modules.inference import InferenceSpec
from lightning_modules.module import GeometryEstimator
from lightning_modules.padding import drop_padding
from lightning_modules.predictor import predict

COLUMNS = ("spacing", "steps", "ensemble", "unet_calls", "ms_per_image", "abs_rel", "delta1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark_inference", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ckpt_path", type=Path, default=Path("runs/demo_e2e/fit/checkpoints/last.ckpt"))
    parser.add_argument(
        "--config", action="append", default=None,
        help="run config(s) whose validation data is used (default: configs/demo.yaml); further unknown arguments "
        "are passed to the CLI as overrides, e.g. --data.init_args.synthetic.cache_dir=...",
    )  # fmt: skip
    parser.add_argument(
        "--spacings", nargs="+", default=["leading", "trailing"], choices=["leading", "trailing", "linspace"]
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 10, 50])
    parser.add_argument("--ensembles", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--images", type=int, default=16, help="validation images to evaluate (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per UNet batch")
    parser.add_argument("--init", choices=["zeros", "gaussian", "pyramid"], default="gaussian")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per row (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.csv and <out>.md as well")
    args, args.overrides = parser.parse_known_args(argv)
    args.config = args.config or ["configs/demo.yaml"]
    if not args.ckpt_path.is_file():
        parser.error(f"checkpoint {args.ckpt_path} not found: run `make demo` first, or pass --ckpt_path")
    if min(args.steps) < 1 or min(args.ensembles) < 1 or args.images < 1 or args.repeats < 1:
        parser.error("--steps, --ensembles, --images and --repeats must be >= 1")
    return args


def validation_images(configs: list[str], overrides: list[str], count: int) -> dict[str, torch.Tensor]:
    """The first `count` validation samples of the run's data (generated on first use), padding dropped; rgb in [0, 1]."""
    arguments = [part for config in configs for part in ("--config", config)] + overrides
    datamodule = cli_main(arguments, run=False).datamodule
    datamodule.prepare_data()
    parts: dict[str, list[torch.Tensor]] = {"rgb": [], "depth": [], "mask": []}
    taken = 0
    for batch in datamodule.val_dataloader():
        batch = drop_padding(batch)
        if batch is None:
            continue
        for name in parts:
            parts[name].append(batch[name])
        taken += len(batch["key"])
        if taken >= count:
            break
    data = {name: torch.cat(chunks)[:count] for name, chunks in parts.items()}
    data["rgb"] = (data["rgb"] + 1) / 2  # the batch contract's [-1, 1] -> predict's [0, 1]
    data["min_depth"], data["max_depth"] = datamodule.min_depth, datamodule.max_depth
    return data


def run_row(model: GeometryEstimator, data: dict, spec: InferenceSpec, ensemble: int, args: argparse.Namespace) -> dict:
    """Predict every image with one setting; time it and score it."""
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = predict(
            model.core,
            model.task,
            data["rgb"],
            processing_resolution=0,
            ensemble_size=ensemble,
            spec=spec,
            batch_size=args.batch_size,
        )
        times.append(time.perf_counter() - started)
    protocol = EvalSpec(min_depth=data["min_depth"], max_depth=data["max_depth"])
    metrics = model.task.make_metrics(protocol).to(result["depth"].device)
    metrics.update(result["depth"], data["depth"], data["mask"])
    scores = metrics.compute()
    count = data["rgb"].shape[0]
    return {
        "spacing": spec.spacing,
        "steps": spec.num_steps,
        "ensemble": ensemble,
        "unet_calls": result["unet_calls"] // count,  # counted in the last pass
        "ms_per_image": 1000 * statistics.median(times) / count,
        "abs_rel": float(scores["abs_rel"]),
        "delta1": float(scores["delta1"]),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| spacing | steps | ensemble | UNet calls / image | ms / image | AbsRel | delta1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['spacing']} | {r['steps']} | {r['ensemble']} | {r['unet_calls']} | {r['ms_per_image']:.1f} "
            f"| {r['abs_rel']:.4f} | {r['delta1']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = GeometryEstimator.load_from_checkpoint(args.ckpt_path, map_location="cpu", weights_only=False)
    if model.task.name != "depth":
        raise SystemExit(f"this benchmark scores depth; {args.ckpt_path} is a {model.task.name} model")
    data = validation_images(args.config, args.overrides, args.images)
    base = dataclasses.replace(model.inference, init_latent=args.init, seed=args.seed)
    # One untimed pass so lazy initialisation and allocator warm-up do not land in the first row.
    predict(
        model.core, model.task, data["rgb"][:1], processing_resolution=0, spec=dataclasses.replace(base, num_steps=1)
    )
    grid = [(s, n, k) for s in args.spacings for n in args.steps for k in args.ensembles]
    rows = []
    for spacing, steps, ensemble in tqdm(grid, desc="settings"):
        spec = dataclasses.replace(base, spacing=spacing, num_steps=steps)
        rows.append(run_row(model, data, spec, ensemble, args))
    table = markdown(rows)
    size = "x".join(str(s) for s in data["rgb"].shape[-2:])
    threads = torch.get_num_threads()
    print(f"\n{data['rgb'].shape[0]} validation images at {size}, init latent {args.init}, {threads} threads\n")
    print(table)
    ms = {(r["spacing"], r["steps"], r["ensemble"]): r["ms_per_image"] for r in rows}
    for spacing in args.spacings:
        one, many = ms.get((spacing, 1, 1)), ms.get((spacing, 50, 10))
        if one and many:
            print(f"\n{spacing}: 50 steps x 10 members takes {many / one:.0f}x the wall time of 1 step x 1 member")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        args.out.with_suffix(".md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
