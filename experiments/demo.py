"""The built-in demo: validate the untrained tiny model, train it, validate the trained one, print both.

    python -m experiments.demo [--config configs/demo.yaml] [extra CLI overrides ...]
"""

from __future__ import annotations

import argparse
import time

from experiments.__main__ import main

REPORTED = ("abs_rel", "delta1", "rmse", "silog", "mean", "median", "a11_25", "a30")


def _metrics(cli, stage: str = "val") -> dict[str, float]:
    values = cli.trainer.callback_metrics
    return {name: float(values[f"{stage}/{name}"]) for name in REPORTED if f"{stage}/{name}" in values}


def run_demo(config: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Run validate -> fit -> validate(last checkpoint) with one config; return metrics before and after."""
    started = time.perf_counter()
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
