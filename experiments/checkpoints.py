"""Load a trained GeometryEstimator from a Lightning checkpoint, optionally checked against the run's config.

Checkpoints carry every constructor argument but the evaluation protocol (objective included), so
`GeometryEstimator.load_from_checkpoint` alone rebuilds the model; a config given next to a checkpoint must agree
with it on what the model is (task, objective, source), or the command stops naming both.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from experiments.config_defaults import expand_config_defaults
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import Objective, build_objective, objective_config
from lightning_modules.tiny import TinySpec

# Model arguments that decide what a checkpoint's weights mean; a config that differs here describes another model.
IDENTITY_KEYS = ("task", "objective", "pretrained", "tiny", "prompt_padding")


def checkpoint_hparams(path: Path) -> dict[str, Any]:
    """The checkpoint's saved hyperparameters, {} if it has none (the weights are memory-mapped, not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # truncated, foreign or corrupt: every reader failure means the same thing here
        raise ValueError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt? {_first_line(error)}); "
            "use a .ckpt that a fit run wrote completely (e.g. its checkpoints/last.ckpt)"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return dict(checkpoint.get("hyper_parameters") or {})


def config_model_args(configs: list[str]) -> dict[str, Any]:
    """`model.init_args` of the merged configs (later files win, `defaults:` expanded), as plain data."""
    return _config_model(configs)[1]


def _config_model(configs: list[str]) -> tuple[bool, dict[str, Any]]:
    """(whether any config has a `model` section, its merged `init_args`)."""
    expanded = expand_config_defaults([arg for config in configs for arg in ("--config", config)])
    merged: dict[str, Any] = {}
    has_model = False
    for path in expanded[1::2]:
        try:
            content = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        except OSError as error:
            raise ValueError(f"config {path} cannot be read: {error}") from error
        if not isinstance(content, dict):
            raise ValueError(f"config {path} is not a mapping of settings (got {type(content).__name__})")
        model = content.get("model")
        if isinstance(model, dict):
            has_model = True
            merged.update(model.get("init_args") or {})
    return has_model, merged


def model_defaults() -> dict[str, Any]:
    """GeometryEstimator's constructor defaults: what a config that leaves a key out means."""
    signature = inspect.signature(GeometryEstimator.__init__)
    return {n: p.default for n, p in signature.parameters.items() if n != "self" and p.default is not p.empty}


def _normalised(key: str, value: Any) -> Any:
    if key == "objective":
        if value is None or isinstance(value, Objective):
            return objective_config(build_objective(value))
        if isinstance(value, dict):
            return {"class_path": value.get("class_path"), "init_args": value.get("init_args") or {}}
    if key == "tiny" and value is not None:
        try:
            return dataclasses.asdict(TinySpec(**value) if isinstance(value, dict) else value)
        except TypeError:
            return value
    if key == "pretrained" and isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _same_objective(wanted: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Same class (a short class name in a config matches the full path), and every argument the config gives."""
    a, b = str(wanted["class_path"]), str(stored["class_path"])
    same_class = a == b or b.rpartition(".")[2] == a
    return same_class and all(stored["init_args"].get(k) == v for k, v in wanted["init_args"].items())


def config_mismatches(configs: list[str], hparams: dict[str, Any]) -> list[str]:
    """Human-readable differences between the configs' model and the checkpoint on IDENTITY_KEYS.

    A key the configs' model section leaves out means GeometryEstimator's default (a depth config need not say
    `task: depth`); configs without any `model` section describe no model and never disagree.
    """
    has_model, given = _config_model(configs)
    if not has_model:
        return []
    wanted = {**model_defaults(), **given}
    problems = []
    for key in IDENTITY_KEYS:
        if key not in wanted or key not in hparams:
            continue
        a, b = _normalised(key, wanted[key]), _normalised(key, hparams[key])
        if key == "objective" and isinstance(a, dict) and isinstance(b, dict):
            same = _same_objective(a, b)
        elif key == "pretrained" and isinstance(a, str) and isinstance(b, str) and a.startswith("standin:"):
            same = True  # resolved to a cache folder when the run started
        else:
            same = a == b
        if not same:
            said = f"{a!r}" if key in given else f"nothing (default {a!r})"
            problems.append(f"{key}: config says {said}, checkpoint has {b!r}")
    return problems


def load_trained_model(ckpt_path: Path, configs: list[str] | None = None) -> GeometryEstimator:
    """The checkpoint's model in eval mode on the CPU; `configs` (the run's) must describe the same model.

    Every failure a user can cause (missing, truncated or foreign file, a config of another model, weights that do
    not fit) raises ValueError or FileNotFoundError with a message naming the file.
    """
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
    try:
        model = GeometryEstimator.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    except (RuntimeError, TypeError, KeyError) as error:
        raise ValueError(
            f"checkpoint {ckpt_path} does not load into a GeometryEstimator: {_first_line(error)}"
        ) from error
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _from_config(ckpt_path: Path, configs: list[str]) -> GeometryEstimator:
    """A checkpoint without hyperparameters: the configs' model with the checkpoint's weights."""
    from experiments.standin import resolve_pretrained

    args = config_model_args(configs)
    if not args:
        raise ValueError(
            f"{ckpt_path} has no saved hyperparameters and config {', '.join(configs)} has no model.init_args: "
            "pass the config.yaml of the fit run that wrote the checkpoint"
        )
    known = model_defaults().keys() | {"objective", "pretrained", "tiny"}
    dropped = sorted(set(args) - known)
    if dropped:
        # e.g. eval_min_depth / eval_max_depth of older runs (the evaluation depth range moved to EvalSpec)
        print(
            f"note: ignoring model arguments of {', '.join(configs)} that GeometryEstimator no longer has: "
            f"{', '.join(dropped)}",
            file=sys.stderr,
        )
        args = {k: v for k, v in args.items() if k not in dropped}
    if isinstance(args.get("pretrained"), str):
        args["pretrained"] = resolve_pretrained(args["pretrained"])
    try:
        model = GeometryEstimator(**args)
    except TypeError as error:
        raise ValueError(f"config {', '.join(configs)} does not describe a GeometryEstimator: {error}") from error
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(checkpoint)  # fills in the frozen VAE weights checkpoints leave out
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {ckpt_path} do not fit the model of config {', '.join(configs)} "
            f"({_first_line(error)}): pass the config of the run that wrote the checkpoint"
        ) from error
    return model.eval()
