"""`python -m experiments.benchmark --mode train|predict|data [options]`: time it, print a table, write JSON + Markdown.

Every mode warms up, repeats (median and spread over rounds) and writes `<out>.json` (machine, versions, settings,
results) and `<out>.md` (the table); default `results/benchmark/<mode>`. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing is ever downloaded

import torch  # noqa: E402

from experiments.benchmark import report  # noqa: E402
from experiments.benchmark.models import ARCHS  # noqa: E402

MODES = ("train", "predict", "data")
SD2_CPU_SIZE = (128, 160)  # what fits the 2-core CPU machine in minutes; 480x640 is for benchmarks/gpu.sh
SD2_CPU_IMAGES = 4


def size(text: str) -> tuple[int, int]:
    """`HxW` -> (H, W)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 480x640, got {text!r}") from error
    return height, width


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_switches(group: argparse._ArgumentGroup, name: str, default: list[bool], help: str) -> None:
    """An option taking `on`, `off` or both (each a configuration measured)."""
    group.add_argument(name, nargs="+", type=on_off, default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--arch", choices=ARCHS, default="tiny", help="tiny model or SD2-size random weights")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", type=int, default=2, help="micro-batch (train, data)")
    p.add_argument("--height", type=int, default=None, help="default 480 (sd2 on the CPU: 128)")
    p.add_argument("--width", type=int, default=None, help="default 640 (sd2 on the CPU: 160)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (per round in train)")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed iterations per round (train/predict 3, sd2 on the CPU 1, data 16)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds; median and spread over them")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; data: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/benchmark/<mode>)")
    p.add_argument("--precisions", nargs="+", choices=["32-true", "bf16-mixed"], default=None,
                   help="train default: both; predict default: 32-true")  # fmt: skip
    train = p.add_argument_group("train")
    train.add_argument("--objectives", nargs="+", choices=["e2e", "diffusion"], default=["e2e", "diffusion"])
    add_switches(train, "--checkpointing", [False, True], "off, on or both")
    train.add_argument("--impls", nargs="+", choices=["lightning", "bare", "reference"],
                       default=["lightning", "bare", "reference"])  # fmt: skip
    add_switches(train, "--channels_last", [False],
                 "UNet and VAE in channels_last (SpeedSpec.channels_last) for ours and bare: off, on or both")  # fmt: skip
    add_switches(train, "--contiguous_group_norm", [True],
                 "SpeedSpec.contiguous_group_norm for ours and bare: on, off or both (the reference: off)")  # fmt: skip
    train.add_argument(
        "--optimizer_impl",
        choices=["auto", "fused", "foreach", "for_loop"],
        default="auto",
        help="AdamW of ours and bare (SpeedSpec.optimizer_impl); the reference keeps torch's default",
    )
    train.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    train.add_argument("--grad_clip", type=float, default=0.0, help="gradient-norm clipping in every implementation")
    pred = p.add_argument_group("predict")
    pred.add_argument("--processing_resolution", type=int, default=0, help="long edge while predicting, 0 = native")
    pred.add_argument("--steps", type=int, default=10, help="DDIM steps of the multi-step setting (0 = skip it)")
    pred.add_argument("--members", type=int, default=10, help="ensemble members of the multi-step setting")
    pred.add_argument("--images", type=int, default=None, help="PNGs for the infer throughput (default 64, 0 = skip)")
    pred.add_argument("--plots", action="store_true", help="run the size and ensemble sweeps and plot them")
    pred.add_argument("--plot_dir", type=Path, default=Path("docs/images"))
    pred.add_argument("--sweep_sizes", nargs="+", type=int, default=[128, 256, 384, 512, 640, 768])
    pred.add_argument("--sweep_members", nargs="+", type=int, default=[1, 2, 4, 10])
    data = p.add_argument_group("data")
    data.add_argument("--resolutions", nargs="+", type=size, default=[(480, 640), (352, 1216)])
    data.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    add_switches(data, "--normals", [False, True], "decode normals.png: off (a depth run), on (a normals run) or both")
    data.add_argument("--samples", type=int, default=32, help="random samples written to the shards")
    data.add_argument("--shuffle_buffer", type=int, default=100)
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Fill mode- and machine-dependent defaults; returns notes for the output."""
    notes = []
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if min(args.batch, args.repeats, args.iters or 1) < 1 or args.warmup < (1 if args.mode == "train" else 0):
        parser.error("--batch, --iters and --repeats must be >= 1, --warmup >= 1 in train (optimiser state)")
    if min(args.steps, args.members, args.images or 0, *args.workers) < 0 or min(args.sweep_members) < 1:
        parser.error("--steps, --members, --images and --workers must be >= 0, --sweep_members >= 1")
    sd2_cpu = args.arch == "sd2" and args.device == "cpu"
    if args.height is None and args.width is None and sd2_cpu and args.mode != "data":
        args.height, args.width = SD2_CPU_SIZE
        notes.append(f"sd2 on the CPU: default size {SD2_CPU_SIZE[0]}x{SD2_CPU_SIZE[1]} (480x640 takes minutes per "
                     "step here; benchmarks/gpu.sh measures it)")  # fmt: skip
    args.height, args.width = args.height or 480, args.width or 640
    if args.height % 8 or args.width % 8:
        parser.error("--height and --width must be multiples of 8")
    if args.images is None:
        args.images = SD2_CPU_IMAGES if sd2_cpu else 64
        if sd2_cpu and args.mode == "predict":
            notes.append(f"sd2 on the CPU: infer throughput on {SD2_CPU_IMAGES} images")
    if args.iters is None and sd2_cpu and args.mode != "data":
        args.iters = 1
        notes.append("sd2 on the CPU: 1 timed iteration per round (seconds to minutes each)")
    args.iters = args.iters or (16 if args.mode == "data" else 3)
    args.precisions = args.precisions or (["32-true", "bf16-mixed"] if args.mode == "train" else ["32-true"])
    args.out = args.out or Path("results/benchmark") / args.mode
    if args.threads is None and args.mode == "data":
        # A dataloader worker runs one torch thread; the main process does too here, so that the 0-workers row is
        # one core's worth and idle intra-op threads do not crowd the workers (2 threads cost them ~20 % here).
        args.threads = 1
        notes.append("data: the main process on 1 torch thread, as every dataloader worker (--threads to change)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return notes


def run(args: argparse.Namespace, notes: list[str]) -> tuple[dict[str, Any], Any]:
    """Run the mode; (its settings, its results)."""
    common = dict(warmup=args.warmup, iters=args.iters, repeats=args.repeats, seed=args.seed)
    if args.mode == "train":
        from experiments.benchmark.train import TrainSettings, run_train

        s = TrainSettings(
            arch=args.arch, device=args.device, batch=args.batch, height=args.height, width=args.width,
            objectives=args.objectives, checkpointing=args.checkpointing, precisions=args.precisions,
            impls=args.impls, channels_last=args.channels_last, contiguous_group_norm=args.contiguous_group_norm,
            optimizer_impl=args.optimizer_impl,
            memory=not args.no_memory, grad_clip=args.grad_clip, **common,
        )  # fmt: skip
        notes.append("ours (lightning) and bare step on one fixed batch already on the device; the reference "
                     "decodes and preprocesses its samples in the step, in fp32 whatever the precision column says")  # fmt: skip
        if s.memory:
            notes.append("peak MB: CUDA max allocated on a GPU; on the CPU VmHWM of a fresh process per "
                         "configuration and implementation (model, one step)")  # fmt: skip
        return asdict(s), run_train(s)
    if args.mode == "predict":
        from experiments.benchmark.predict import PredictSettings, run_predict

        s = PredictSettings(
            arch=args.arch, device=args.device, height=args.height, width=args.width,
            processing_resolution=args.processing_resolution, steps=args.steps, members=args.members,
            precisions=args.precisions, images=args.images, sweep=args.plots, sweep_sizes=args.sweep_sizes,
            sweep_members=args.sweep_members, **common,
        )  # fmt: skip
        results = run_predict(s)
        if args.plots:
            gpu = report.machine(torch.device(args.device))["gpu"]
            where = gpu["name"] if gpu else f"{report.cpu_model()}, {torch.get_num_threads()} threads"
            title = f"predict cost: {args.arch}, {s.precisions[0]}, {where}"
            for path in report.plot_predict(results, args.plot_dir, title):
                notes.append(f"plot: {path}")
        return asdict(s), results
    from experiments.benchmark.data import DataSettings, run_data

    s = DataSettings(
        resolutions=args.resolutions, workers=args.workers, normals=args.normals, batch=args.batch, samples=args.samples,
        shuffle_buffer=args.shuffle_buffer, **common,
    )  # fmt: skip
    notes.append("TrainStream (decode + targets + flip) through a DataLoader; per worker = all / max(workers, 1); "
                 "normals off = a depth run (normals.png not decoded), on = a normals run")  # fmt: skip
    return asdict(s), run_data(s)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one mode; returns the JSON document it wrote."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = resolve(args, parser)
    device = torch.device(args.device)
    start = report.machine(device)
    settings, results = run(args, notes)
    doc = report.payload(args.mode, argv, device, settings, results, notes)
    doc["machine"]["load_average"] = start["load_average"]
    json_path, md_path = report.write(doc, args.out)
    print()
    print(report.markdown(doc))
    print(f"wrote {json_path} and {md_path}")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
