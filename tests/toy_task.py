"""A third task written by following docs/extending.md: affine-invariant disparity (inverse depth).

Imported by tests only; importing it registers the task as `toy_disparity`. It uses the batch keys the data side
already provides (`depth`, `mask`), so no datamodule change is needed (docs/extending.md, "Adding a task").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.evaluation import EvalSpec
from lightning_modules.losses import affine_invariant_l1
from lightning_modules.tasks import Task, register_task
from lightning_modules.tasks.base import resize_bilinear


def normalised_disparity(batch: dict[str, Tensor]) -> Tensor:
    """Per-image disparity of the valid pixels, min-max scaled to [-1, 1] (0 where invalid)."""
    mask = batch["mask"].bool()
    disparity = torch.where(mask, 1 / batch["depth"].clamp_min(1e-6), 0)
    flat_max = torch.where(mask, disparity, -torch.inf).flatten(1).amax(1).view(-1, 1, 1, 1)
    flat_min = torch.where(mask, disparity, torch.inf).flatten(1).amin(1).view(-1, 1, 1, 1)
    scaled = 2 * (disparity - flat_min) / (flat_max - flat_min).clamp_min(1e-6) - 1
    return torch.where(mask, scaled.clamp(-1, 1), 0)


class DisparityL1(Metric):
    """Mean absolute error of prediction ([0, 1]) against per-image normalised disparity ([0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor, mask: Tensor) -> None:
        self.error += ((prediction.float() - target.float()).abs() * mask).sum().double()
        self.pixels += mask.sum().double()

    def compute(self) -> dict[str, Tensor]:
        return {"disparity_l1": self.error / self.pixels.clamp_min(1)}


@register_task
class ToyDisparityTask(Task):
    """Affine-invariant disparity: near = +1 in model conventions, output in [0, 1] (1 = near)."""

    name = "toy_disparity"
    columns = (("disparity_l1", "L1", 1),)

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        return normalised_disparity(batch).repeat(1, 3, 1, 1)

    def from_decoded(self, decoded: Tensor) -> Tensor:
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["mask"].bool()

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return affine_invariant_l1(prediction, normalised_disparity(batch), self.valid_mask(batch))

    def make_metrics(self, protocol: EvalSpec) -> Metric:
        return DisparityL1()

    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        metrics.update(prediction, (normalised_disparity(batch) + 1) / 2, self.valid_mask(batch))

    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        image = ((batch["rgb"][i].float().cpu() + 1) / 2).clamp(0, 1)
        return torch.cat([image, prediction[i].float().cpu().expand(3, -1, -1)], dim=2)

    def to_output(self, prediction: Tensor) -> Tensor:
        return (prediction.float() + 1) / 2

    def ensemble(self, members: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return members.mean(dim=0), members.std(dim=0)

    def resize_output(self, prediction: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_bilinear(prediction, size).clamp(0, 1)

    def write_outputs(self, stem: str | Path, prediction: Tensor, uncertainty: Tensor | None) -> list[Path]:
        path = Path(f"{stem}_disparity.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, prediction[0].float().cpu().numpy())
        return [path]
