"""Load a trained GeometryEstimator from a Lightning checkpoint, optionally checked against the run's config.

Checkpoints carry every constructor argument but the evaluation protocol (objective included), so
`GeometryEstimator.load_from_checkpoint` alone rebuilds the model; a config given next to a checkpoint must agree
with it on what the model is (task, objective, source), or the command stops naming both.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from experiments.config_defaults import expand_config_defaults
from lightning_modules.module import GeometryEstimator

# Model arguments that decide what a checkpoint's weights mean; a config that differs here describes another model.
IDENTITY_KEYS = ("task", "objective", "pretrained", "tiny", "prompt_padding")


def checkpoint_hparams(path: Path) -> dict[str, Any]:
    """The checkpoint's saved hyperparameters, {} if it has none (the weights are memory-mapped, not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return dict(checkpoint.get("hyper_parameters") or {})


def config_model_args(configs: list[str]) -> dict[str, Any]:
    """`model.init_args` of the merged configs (later files win, `defaults:` expanded), as plain data."""
    expanded = expand_config_defaults([arg for config in configs for arg in ("--config", config)])
    merged: dict[str, Any] = {}
    for path in expanded[1::2]:
        try:
            content = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        model = content.get("model") or {}
        merged.update((model.get("init_args") or {}) if isinstance(model, dict) else {})
    return merged


def _normalised(key: str, value: Any) -> Any:
    if key == "objective" and isinstance(value, dict):
        return {"class_path": value.get("class_path"), "init_args": value.get("init_args") or {}}
    return value


def config_mismatches(configs: list[str], hparams: dict[str, Any]) -> list[str]:
    """Human-readable differences between the configs' model and the checkpoint on IDENTITY_KEYS."""
    wanted = config_model_args(configs)
    problems = []
    for key in IDENTITY_KEYS:
        if key not in wanted or key not in hparams:
            continue
        a, b = _normalised(key, wanted[key]), _normalised(key, hparams[key])
        if key == "objective" and isinstance(a, dict) and isinstance(b, dict):
            same = a["class_path"] == b["class_path"] and all(
                b["init_args"].get(k) == v for k, v in a["init_args"].items()
            )
        elif key == "pretrained" and isinstance(a, str) and isinstance(b, str) and a.startswith("standin:"):
            same = True  # resolved to a cache folder when the run started
        else:
            same = a == b
        if not same:
            problems.append(f"{key}: config says {a!r}, checkpoint has {b!r}")
    return problems


def load_trained_model(ckpt_path: Path, configs: list[str] | None = None) -> GeometryEstimator:
    """The checkpoint's model in eval mode on the CPU; `configs` (the run's) must describe the same model."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (expected a Lightning .ckpt file)")
    hparams = checkpoint_hparams(ckpt_path)
    if not hparams:
        if not configs:
            raise ValueError(
                f"{ckpt_path} has no saved hyperparameters, so the model cannot be rebuilt from it alone: "
                "pass the run's config with --config RUN.yaml (the config.yaml the fit run saved)"
            )
        return _from_config(ckpt_path, configs)
    if configs:
        problems = config_mismatches(configs, hparams)
        if problems:
            raise ValueError(
                f"checkpoint {ckpt_path} and config {', '.join(configs)} describe different models: "
                + "; ".join(problems)
                + ". Pass the config the checkpoint was trained with, or leave --config out."
            )
    return GeometryEstimator.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False).eval()


def _from_config(ckpt_path: Path, configs: list[str]) -> GeometryEstimator:
    """A checkpoint without hyperparameters: the configs' model with the checkpoint's weights."""
    from experiments.standin import resolve_pretrained

    args = config_model_args(configs)
    if isinstance(args.get("pretrained"), str):
        args["pretrained"] = resolve_pretrained(args["pretrained"])
    try:
        model = GeometryEstimator(**args)
    except TypeError as error:
        raise ValueError(f"config {', '.join(configs)} does not describe a GeometryEstimator: {error}") from error
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(checkpoint)  # fills in the frozen VAE weights checkpoints leave out
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
