"""Fault injection, messages: bad config keys and YAML, user errors without tracebacks, what a fit prints."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from experiments.__main__ import main
from experiments.console import StepProgressBar, silence_known_noise
from tests.helpers import tiny_run_args


def test_a_bad_key_names_its_config_file_and_line_after_a_short_usage(tmp_path, shard_cache, capsys):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("model:\n  init_args:\n    lr: 1.0e-4\n    learning_rate: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache), "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and f"{bad}:4" in err
    assert err.index("error:") < 400  # the usage before it is one line, not the 50-line option list
    assert len(err[: err.index("error:")].splitlines()) <= 3


def test_a_broken_yaml_names_its_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1,\n")
    with pytest.raises(SystemExit, match=rf"{broken} line 3, column 1: not valid YAML"):
        main(["fit", "--config", str(broken)])


def test_a_user_error_in_a_constructor_is_one_message(tmp_path, shard_cache):
    args = [*tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache), "--model.init_args.tiny=null"]
    with pytest.raises(SystemExit, match=r"^error: .*give exactly one of `pretrained`.*raised in module.py:\d+"):
        main(["fit", *args, "--trainer.max_steps=1"])


def test_fit_says_where_it_writes_and_counts_steps(tmp_path, shard_cache, caplog):
    args = [a for a in tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache) if "enable_progress_bar" not in a]
    with caplog.at_level(logging.INFO):
        cli = main(["fit", *args, "--trainer.max_steps=3", "--batch.effective_batch_size=4"])  # 2 micro-batches/step
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fit: logs in"))
    assert str(Path(cli.trainer.log_dir)) in message and "checkpoints in" in message
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)]
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.n == 3  # steps, not micro-batches
    assert bar.train_progress_bar.desc.startswith("train steps")


def test_known_noise_is_silenced_and_nothing_else(caplog):
    silence_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_noise()  # re-applies the filters over simplefilter, as the CLI does at import
        warnings.warn("Found 185 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "`accelerate` was not found ... pip install accelerate"
        )
        logging.getLogger("diffusers.models.modeling_utils").warning("a real warning")
    assert [r.getMessage() for r in caplog.records] == ["a real warning"]
