"""Command line: `python -m datamodules.convert <name> --src RAW --out SHARDS [options]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.convert import DATASETS, run_conversion

COMMON = {"src", "out", "split_list", "workers", "shard_size", "prefix", "quiet", "name"}


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per dataset, with the common options and the dataset's own."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.convert", description="Convert a raw dataset into WebDataset shards."
    )
    names = parser.add_subparsers(dest="name", required=True, metavar="<name>")
    for dataset in DATASETS.values():
        sub = names.add_parser(dataset.name, help=dataset.summary, description=dataset.summary)
        sub.add_argument("--src", required=True, help="raw dataset folder (layout: see the module docstring/README)")
        sub.add_argument("--out", required=True, help="output folder for the shards (resumes if it holds a run)")
        sub.add_argument("--split-list", help="optional list of samples in the upstream format")
        sub.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        sub.add_argument("--shard-size", type=int, default=dataset.shard_size,
                         help=f"samples per shard (default {dataset.shard_size})")  # fmt: skip
        sub.add_argument("--prefix", help=f"shard name prefix (default: the split, {dataset.prefix})")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        if dataset.add_arguments is not None:
            dataset.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; exit status 1 when nothing was written."""
    args = build_parser().parse_args(argv)
    dataset = DATASETS[args.name]
    options = {k: v for k, v in vars(args).items() if k not in COMMON}
    prefix = args.prefix or options.get("partition") or options.get("split") or dataset.prefix
    try:
        report = run_conversion(
            dataset, args.src, args.out, split_list=args.split_list, workers=args.workers, shard_size=args.shard_size,
            prefix=prefix, options=options, progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Complete shards keep their final names; the shard in progress is only a `.tar.tmp` that a rerun rewrites.
        done = len(list(Path(args.out).glob(f"{prefix}-*.tar")))
        print(f"\ninterrupted: {done} complete shards in {args.out}; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
