"""What a task provides: every depth/normals decision lives in a `Task` subclass, nowhere else.

A task is the one place that knows what its prediction is: the training target and loss, how a decoded VAE image
becomes a prediction, the metrics and their table columns, previews, output conventions, ensembling, the files
`infer` and `predict` write, and the diffusers pipeline it exports to. docs/extending.md shows how to add one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.evaluation import EvalSpec

# (metric key, column header, factor) of the Markdown metric table
Column = tuple[str, str, float]


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize [B,C,h,w] -> [B,C,*size] (a no-op at the same size), as the stock pipelines do."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return MarigoldImageProcessor.resize_antialias(x, size, "bilinear", is_aa=True)


class Task(ABC):
    """Interface of a task; subclasses set `name` and are registered with `register_task`."""

    name: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]] = ()
    # diffusers pipeline class name and model_index.json keys of an exported folder; None = not exportable
    pipeline: ClassVar[tuple[str, dict[str, Any]] | None] = None
    pipeline_output: ClassVar[str] = ""  # what the exported pipeline's `.prediction` holds, for usage lines
    # Whether the batch's `normals` are read (loss, metrics, previews); False lets the data skip decoding
    # normals.png (experiments sets the datamodule's `decode_normals` from it).
    needs_normals: ClassVar[bool] = True

    # ------------------------------------------------------------------------------------------- training
    @abstractmethod
    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        """Three-channel image in [-1, 1] that the diffusion objective encodes as its target latent."""

    @abstractmethod
    def from_decoded(self, decoded: Tensor) -> Tensor:
        """Prediction in model conventions from a decoded VAE image [B,3,H,W]."""

    @abstractmethod
    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Bool [B,1,H,W]: pixels the loss and the metrics count."""

    @abstractmethod
    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Task loss (float32) of a prediction in model conventions against the batch."""

    # ----------------------------------------------------------------------------------------- evaluation
    @abstractmethod
    def make_metrics(self, protocol: EvalSpec) -> Metric:
        """Metric collection for one stage under an evaluation protocol (depth range already resolved)."""

    @abstractmethod
    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        """Add a batch of predictions in output conventions."""

    @abstractmethod
    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        """One row [3,h,W] of the TensorBoard preview grid for sample i."""

    # ------------------------------------------------------------------------------------------ inference
    @abstractmethod
    def to_output(self, prediction: Tensor) -> Tensor:
        """Model conventions -> output conventions (what users and metrics get), float32."""

    def ensemble_options(self, protocol: EvalSpec) -> dict[str, Any]:
        """Keyword options of `ensemble` under an evaluation protocol (none by default)."""
        return {}

    @abstractmethod
    def ensemble(self, members: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Fuse K members [K,C,h,w] of one image into a prediction [C,h,w] and an uncertainty [1,h,w] (or None)."""

    @abstractmethod
    def resize_output(self, prediction: Tensor, size: tuple[int, int]) -> Tensor:
        """Prediction [1,C,h,w] in output conventions at the input size, conventions kept (range, unit length)."""

    @abstractmethod
    def write_outputs(self, stem: str | Path, prediction: Tensor, uncertainty: Tensor | None) -> list[Path]:
        """Write one image's prediction [C,H,W] (and uncertainty [1,H,W]) as files named `<stem>_*`."""

    def output_files(self, stem: str | Path, with_uncertainty: bool) -> list[Path] | None:
        """The files `write_outputs(stem, ...)` writes (with an uncertainty map or without), or None if the task
        does not say; `infer` skips an image on a rerun only when every one of them exists (None: never skipped)."""
        return None

    @classmethod
    def folder_options(cls, index: dict[str, Any]) -> dict[str, Any]:
        """Constructor options a diffusers folder's model_index.json sets for this task (none by default), so that
        `build_task(name, **options)` decodes the folder's predictions as its stock pipeline does."""
        return {}

    def resize_output_uncertainty(self, uncertainty: Tensor, size: tuple[int, int]) -> Tensor:
        """Uncertainty [1,1,h,w] at the input size (non-negative)."""
        return resize_bilinear(uncertainty, size).clamp_min(0)

    def matches_pipeline(self, index: dict[str, Any]) -> bool:
        """Whether a diffusers folder's model_index.json names this task's pipeline class."""
        return self.pipeline is not None and index.get("_class_name") == self.pipeline[0]

    def matches_prediction_type(self, index: dict[str, Any]) -> bool:
        """Whether model_index.json's `prediction_type` is this task's (folders of other pipeline classes)."""
        return self.pipeline is not None and index.get("prediction_type") == self.pipeline[1].get("prediction_type")


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its name (`task: <name>` in configs)."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name].__qualname__}")
    TASKS[cls.name] = cls
    return cls


def build_task(name: str, **options: Any) -> Task:
    """The registered task `name`, built with its constructor options (e.g. normals' `use_full_z_range`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    cls = TASKS[name]
    accepted = [] if cls.__init__ is object.__init__ else list(inspect.signature(cls.__init__).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} takes no option {', '.join(unknown)} (its options: {accepted or 'none'})")
    return cls(**options)


def task_of_folder(index: dict[str, Any], requested: str | None = None) -> str:
    """Task of a diffusers folder from its model_index.json, unless contradicted by an explicit request."""
    tasks = [cls() for cls in TASKS.values()]
    by_class = [t.name for t in tasks if t.matches_pipeline(index)]
    stored = (by_class or [t.name for t in tasks if t.matches_prediction_type(index)] or [None])[0] if index else None
    if requested and stored and requested != stored:
        raise ValueError(f"task {requested!r} contradicts the folder's model_index.json ({stored} pipeline)")
    return requested or stored or "depth"
