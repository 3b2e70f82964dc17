"""The built-in demo: build the SD2 stand-in (cached after the first run), validate the freshly widened model,
E2E fine-tune it, validate the trained one, print both.

    python -m experiments.demo [--config configs/demo.yaml] [extra CLI overrides ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.__main__ import main
from experiments.config_defaults import expand_config_defaults
from experiments.standin import STANDIN_SCHEME, build_standin

REPORTED = ("abs_rel", "delta1", "rmse", "silog", "mean", "median", "a11_25", "a30")


def _metrics(cli, stage: str = "val") -> dict[str, float]:
    values = cli.trainer.callback_metrics
    return {name: float(values[f"{stage}/{name}"]) for name in REPORTED if f"{stage}/{name}" in values}


def uses_standin(config: str, overrides: list[str]) -> bool:
    """Whether the composed config (or an override) names a `standin:` model."""
    files = [a for i, a in enumerate(expand_config_defaults(["--config", config])) if i % 2]
    texts = [Path(f).read_text() for f in files] + overrides
    return any(STANDIN_SCHEME in text for text in texts)


def run_demo(config: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Run validate -> fit -> validate(last checkpoint) with one config; return metrics before and after."""
    started = time.perf_counter()
    if uses_standin(config, overrides):
        build_standin()  # before the runs, so the first one's timing and random state do not include it
        print(f"Stand-in ready after {(time.perf_counter() - started) / 60:.1f} min.", flush=True)
    common = ["--config", config, *overrides]
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
