"""`defaults:` in a config file: a list of group files (relative to it) applied before it, Hydra style.

`--config configs/demo.yaml` whose first key is `defaults: [trainer/cpu.yaml, model/x.yaml]` expands to
`--config configs/trainer/cpu.yaml --config configs/model/x.yaml --config configs/demo.yaml`, so an experiment
file holds only what differs from its groups and later `--config`/flags still override everything.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _defaults_of(path: Path) -> list[Path]:
    if not path.is_file():
        return []
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from error
    if not isinstance(content, dict):
        return []
    entries = content.get("defaults") or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: `defaults` must be a list of config files")
    resolved = [(path.parent / entry).resolve() for entry in entries]
    for entry in resolved:
        if not entry.is_file():
            raise FileNotFoundError(f"{path}: default config {entry} does not exist")
    return resolved


def _expand(path: Path, seen: tuple[Path, ...]) -> list[str]:
    if path.resolve() in seen:
        raise ValueError(f"config defaults form a cycle through {path}")
    args: list[str] = []
    for entry in _defaults_of(path):
        args += _expand(entry, seen + (path.resolve(),))
    return args + ["--config", str(path)]


def expand_config_defaults(args: list[str]) -> list[str]:
    """Insert each `--config` file's `defaults` (recursively) before it; other arguments pass unchanged."""
    expanded: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            expanded += _expand(Path(args[i + 1]), ())
            i += 2
            continue
        if arg.startswith("--config="):
            expanded += _expand(Path(arg.split("=", 1)[1]), ())
        else:
            expanded.append(arg)
        i += 1
    return expanded
