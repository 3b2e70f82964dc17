"""Readable command-line errors: a short usage line, the config file and line of a bad key, no traceback for user
errors (set DGFT_TRACEBACK=1 to get it)."""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from lightning_modules.module import NoValidPixelsError

# Exceptions that mean "your input is wrong" (bad config value, missing file, refused overwrite, data with nothing to
# learn from), not "a bug".
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, NoValidPixelsError,
)  # fmt: skip
_KEY_PATTERNS = (
    r"Option '([\w.]+)' is not accepted",
    r'Key "([\w.]+)" is not expected',
    r"No action for key \"([\w.]+)\"",
)
config_files: list[str] = []  # the expanded --config files of the current command, for locating bad keys


def simplify(message: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes" -> just the real cause(s)."""
    if "Does not validate against any of the Union subtypes" not in message or "Errors:" not in message:
        return message
    head = message.split("Does not validate", 1)[0].strip()
    body = message.split("Errors:", 1)[1].split("\nGiven value type:", 1)[0].split("\n  Given value type:", 1)[0]
    causes, current = [], []
    for line in body.splitlines():
        if re.match(r"^\s*- ", line):
            if current:
                causes.append("\n".join(current))
            current = [line.strip()[2:]]
        elif line.strip() and current:
            current.append(line.strip())
    if current:
        causes.append("\n".join(current))
    causes = [c for c in causes if not c.startswith("Expected a <class 'NoneType'>")] or causes
    return "\n".join(filter(None, [head, *causes]))


def locate_key(key: str, files: list[str]) -> list[str]:
    """`file:line` of every line in `files` that sets `key` (its last dotted part), in order."""
    name = key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*-?\s*{re.escape(name)}\s*:")
    found = []
    for path in files:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        found += [f"{path}:{number}" for number, line in enumerate(lines, 1) if pattern.match(line)]
    return found


class ConciseParser(LightningArgumentParser):
    """One usage line instead of the full option list before an error, plus where a rejected key was set."""

    def print_usage(self, file=None) -> None:  # noqa: ANN001 (argparse's signature)
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} --config FILE [--config FILE ...] [--section.key VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        message = simplify(message)
        keys = [k for p in _KEY_PATTERNS for k in re.findall(p, message)]
        places = [place for key in dict.fromkeys(keys) for place in locate_key(key, config_files)]
        if places:
            message = f"{message}\n  set in: {', '.join(places)}"
        elif keys:
            message = f"{message}\n  (given on the command line, or not in any --config file)"
        super().error(message, ex)


def exit_with(error: BaseException) -> NoReturn:
    """Print a user error as one message with where it was raised, and exit with status 2."""
    if os.environ.get("DGFT_TRACEBACK") == "1":
        raise error
    origin = error
    while (origin.__cause__ or origin.__context__) is not None:  # jsonargparse re-raises the constructor's error
        origin = origin.__cause__ or origin.__context__
    frame = traceback.extract_tb(origin.__traceback__)[-1] if origin.__traceback__ else None
    where = (
        f" (raised in {Path(frame.filename).name}:{frame.lineno}; DGFT_TRACEBACK=1 shows the traceback)"
        if frame
        else ""
    )
    raise SystemExit(f"error: {simplify(str(error))}{where}") from None
