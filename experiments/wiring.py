"""What the model tells the datamodule before a run: whether the data must decode normals.png."""

from __future__ import annotations

from typing import Any


def match_decoding(model: Any, datamodule: Any) -> None:
    """Set `datamodule.decode_normals` from the task where it is None; refuse False for a task that reads normals.

    Either side may lack the attributes (another model or datamodule class): nothing is changed then.
    """
    task = getattr(model, "task", None)
    if task is None or not hasattr(datamodule, "decode_normals"):
        return
    needs = bool(getattr(task, "needs_normals", True))
    if datamodule.decode_normals is None:
        datamodule.decode_normals = needs
    elif needs and not datamodule.decode_normals:
        raise ValueError(
            f"data.init_args.decode_normals is false, but the {task.name!r} task reads normals: "
            "remove the setting (or set it to true)"
        )
