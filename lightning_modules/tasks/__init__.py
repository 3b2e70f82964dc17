"""Tasks: what is predicted (docs/extending.md). Importing this package registers the built-in tasks."""

from lightning_modules.tasks.base import TASKS, Task, build_task, register_task, task_of_folder
from lightning_modules.tasks.depth import DepthTask
from lightning_modules.tasks.normals import NormalsTask

__all__ = [
    "TASKS", "DepthTask", "NormalsTask", "Task", "build_task", "register_task", "task_of_folder",
]  # fmt: skip
