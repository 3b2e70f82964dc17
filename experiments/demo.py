"""The built-in demo: build the SD2 stand-in (cached after the first run), validate the freshly widened model,
E2E fine-tune it, validate the trained one, print both.

    python -m experiments.demo [--config configs/demo.yaml] [extra CLI overrides ...]

The three runs log under fixed versions (`<save_dir>/<name>/{before,fit,after}`, runs/demo_e2e by default). A
second demo must not mix its logs and checkpoints with the first one's, so an existing `<save_dir>/<name>` folder
is first moved to `<save_dir>/<name>.old-YYYYmmdd-HHMMSS` (with an empty logger name: each version folder).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import yaml

from experiments.__main__ import main
from experiments.config_defaults import expand_config_defaults
from experiments.run_dir import move_aside
from experiments.standin import STANDIN_SCHEME, build_standin

VERSIONS = ("before", "fit", "after")

REPORTED = ("abs_rel", "delta1", "rmse", "silog", "mean", "median", "a11_25", "a30")


def _metrics(cli, stage: str = "val") -> dict[str, float]:
    values = cli.trainer.callback_metrics
    return {name: float(values[f"{stage}/{name}"]) for name in REPORTED if f"{stage}/{name}" in values}


def uses_standin(config: str, overrides: list[str]) -> bool:
    """Whether the composed config (or an override) names a `standin:` model."""
    files = [a for i, a in enumerate(expand_config_defaults(["--config", config])) if i % 2]
    texts = [Path(f).read_text() for f in files] + overrides
    return any(STANDIN_SCHEME in text for text in texts)


def logger_folder(common: list[str]) -> tuple[Path, str] | None:
    """(save_dir, name) of the TensorBoard logger as the CLI resolves `common` (config files and overrides)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main(["validate", *common, "--print_config"])
    except SystemExit as stop:  # --print_config exits with 0 after printing; anything else is a real error
        if stop.code not in (0, None):
            raise
    logger = ((yaml.safe_load(printed.getvalue()) or {}).get("trainer") or {}).get("logger")
    init_args = logger.get("init_args") if isinstance(logger, dict) else None
    if not isinstance(init_args, dict) or init_args.get("save_dir") is None:
        return None
    return Path(init_args["save_dir"]), str(init_args.get("name") or "")


def set_aside_earlier_demo(common: list[str]) -> list[Path]:
    """Move an earlier demo's folders out of the way (see the module docstring); return where they went."""
    found = logger_folder(common)
    if found is None:
        return []
    save_dir, name = found
    folders = [save_dir / name] if name else [save_dir / version for version in VERSIONS]
    moved = []
    for folder in folders:
        aside = move_aside(folder, "old")
        if aside is not None:
            print(f"{folder} holds an earlier demo: moved it to {aside} (delete it when no longer needed).")
            moved.append(aside)
    return moved


def run_demo(config: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Run validate -> fit -> validate(last checkpoint) with one config; return metrics before and after."""
    started = time.perf_counter()
    if uses_standin(config, overrides):
        build_standin()  # before the runs, so the first one's timing and random state do not include it
        print(f"Stand-in ready after {(time.perf_counter() - started) / 60:.1f} min.", flush=True)
    common = ["--config", config, *overrides]
    set_aside_earlier_demo(common)
    before = _metrics(main(["validate", *common, "--trainer.logger.init_args.version=before"]))
    fit = main(["fit", *common, "--trainer.logger.init_args.version=fit"])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    after_cli = main(["validate", *common, "--ckpt_path", checkpoint, "--trainer.logger.init_args.version=after"])
    after = _metrics(after_cli)
    elapsed = time.perf_counter() - started
    print(f"\nDemo finished in {elapsed / 60:.1f} min ({fit.trainer.global_step} optimiser steps).")
    print(f"{'metric':<10}{'before':>10}{'after':>10}")
    for name in REPORTED:
        if name in before and name in after:
            print(f"{name:<10}{before[name]:>10.4f}{after[name]:>10.4f}")
    print(f"Checkpoint: {checkpoint}\nTensorBoard: tensorboard --logdir {fit.trainer.logger.save_dir}")
    return {"before": before, "after": after}


def parse_args(argv: list[str] | None = None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="experiment config (default: %(default)s)")
    known, overrides = parser.parse_known_args(argv)
    return known.config, overrides


if __name__ == "__main__":
    run_demo(*parse_args())
