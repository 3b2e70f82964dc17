"""Before `test`: the evaluation protocol in use must be the one the evaluation shards were converted for."""

from __future__ import annotations

from typing import Any

from lightning_modules.evaluation import check_protocol


def protocol_problems(model: Any, datamodule: Any) -> list[str]:
    """Mismatches between the model's `evaluation` spec and the test shards' `eval_*` metadata ([] = none).

    Shards without `eval_protocol` (synthetic or training shards) record no protocol, so nothing is checked.
    """
    spec, read = getattr(model, "evaluation", None), getattr(datamodule, "shard_metadata", None)
    if spec is None or read is None:
        return []
    meta = read("test")
    if not meta or "eval_protocol" not in meta:
        return []
    return check_protocol(spec, meta)


def require_matching_protocol(model: Any, datamodule: Any, allow_mismatch: bool) -> None:
    """Stop with one clear message listing every mismatch, unless the user allowed it."""
    problems = protocol_problems(model, datamodule)
    if not problems:
        return
    dataset = getattr(model.evaluation, "dataset", "?")
    message = (
        f"the evaluation protocol {dataset!r} does not match the test shards' eval_* metadata:\n  - "
        + "\n  - ".join(problems)
        + "\nUse the dataset's configs/eval/<name>.yaml, or pass --allow_protocol_mismatch=true to evaluate anyway."
    )
    if allow_mismatch:
        print(f"warning: {message}")
        return
    raise SystemExit(f"error: {message}")
