"""Final validation metrics of several runs side by side: `python -m experiments.compare runs/paper_depth`.

A run is a folder holding TensorBoard event files (a logger version folder, e.g. runs/paper_depth/e2e_ft_sd2/job_42);
every such folder under the given paths is one row. A metric's final value is the one logged at the highest step
(the latest write wins when a requeued run logged that step twice).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

EVENTS = "events.out.tfevents.*"


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Folders holding event files at or below each path, sorted."""
    runs: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        runs |= {event.parent for event in path.rglob(EVENTS)}
    return sorted(runs)


def final_metrics(run: Path, prefix: str = "val/") -> tuple[int | None, dict[str, float]]:
    """(last step, {tag: value at its highest step}) for the scalars of `run` whose tag starts with `prefix`."""
    events = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0 = keep every point
    events.Reload()
    values, last_step = {}, None
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            final = max(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            values[tag] = final.value
            last_step = final.step if last_step is None else max(last_step, final.step)
    return last_step, values


def run_names(runs: list[Path]) -> list[str]:
    """Each run's path relative to the runs' common folder (its own name when there is one run)."""
    if len(runs) == 1:
        return [runs[0].name]
    root = Path(os.path.commonpath([str(r) for r in runs]))
    return [str(r.relative_to(root)) for r in runs]


def format_table(names: list[str], rows: list[tuple[int | None, dict[str, float]]], metrics: list[str]) -> str:
    """A Markdown table: one row per run, one column per metric, '-' where a run did not log it."""

    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.4g}"

    header = ["run", "step", *metrics]
    lines = [header, ["---"] * len(header)]
    for name, (step, values) in zip(names, rows):
        lines.append([name, "-" if step is None else str(step), *(cell(values.get(m)) for m in metrics)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table; exit status 1 if no run or no metric was found."""
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or folders above them (e.g. runs/paper_depth)")
    parser.add_argument("--prefix", default="val/", help="metric tag prefix (default val/; test/ for test runs)")
    parser.add_argument("--metrics", nargs="+", help="metric names with or without the prefix (default: all)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not runs:
        print(f"no TensorBoard event files under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    rows = [final_metrics(run, args.prefix) for run in runs]
    found = sorted({tag for _, values in rows for tag in values})
    metrics = [m if m.startswith(args.prefix) else args.prefix + m for m in args.metrics] if args.metrics else found
    if not found:
        print(f"no '{args.prefix}*' metrics in {len(runs)} runs", file=sys.stderr)
        return 1
    print(format_table(run_names(runs), rows, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
