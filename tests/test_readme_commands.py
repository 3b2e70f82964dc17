"""Every `python -m ...` command printed in the README names a real module and only options it accepts."""

from __future__ import annotations

import importlib
import io
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from functools import cache

import pytest

from tests.helpers import ROOT

# LightningCLI accepts nested `--section.key` options that only exist once a class is chosen; their keys are
# checked by the CLI tests instead. Here: the subcommand and the top-level groups.
LIGHTNING_CLI = "experiments"
LIGHTNING_GROUPS = {"--config", "--ckpt_path", "--trainer", "--model", "--data", "--batch", "--allow_protocol_mismatch"}


def readme_commands() -> list[str]:
    """`python -m` commands in the README's code blocks and inline code, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if "python -m " in line:
                commands.append(line[line.index("python -m ") :])
    for inline in re.findall(r"`((?:srun )?python -m [^`]+)`", text):
        commands.append(inline[inline.index("python -m ") :])
    return sorted(set(commands))


@cache
def help_text(module: str, subcommand: str | None) -> str:
    """`python -m module [subcommand] --help`: in-process through the module's `main(argv)`, else a subprocess."""
    argv = [*([subcommand] if subcommand else []), "--help"]
    try:
        entry = importlib.import_module(f"{module}.__main__").main
    except ModuleNotFoundError:
        entry = getattr(importlib.import_module(module), "main", None)
    if entry is None:
        done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"python -m {module} {' '.join(argv)} failed:\n{done.stderr[-2000:]}"
        return done.stdout
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exited:
        entry(argv)
    assert exited.value.code in (0, None), f"python -m {module} {' '.join(argv)} exited {exited.value.code}"
    return out.getvalue()


COMMANDS = readme_commands()


def test_the_readme_has_commands() -> None:
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_accepted(command: str) -> None:
    words = shlex.split(re.sub(r"[\[\]]", " ", command))
    module, rest = words[2], words[3:]
    if module == "...":
        pytest.skip("an elided command")
    subcommand = rest[0] if rest and not rest[0].startswith("-") else None
    if subcommand is not None and (subcommand.startswith("<") or "/" in subcommand):
        # a placeholder (`<name>`: any converter has the common options) or a positional path argument
        subcommand = "nyuv2" if module == "datamodules.convert" else None
    usage = help_text(module, subcommand)
    options = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    for option in options:
        if module == LIGHTNING_CLI:
            assert option.split(".", 1)[0] in LIGHTNING_GROUPS | set(re.findall(r"--[\w.]+", usage)), (command, option)
        else:
            assert option in usage, f"{command}: {option} is not an option of python -m {module} {subcommand or ''}"
