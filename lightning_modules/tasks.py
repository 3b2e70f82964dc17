"""What is predicted: conversions between decoded VAE images and predictions, task losses, metrics, previews.

Depth (docs/method.md §1.6, §2.2.1): channel mean of the decoded image clamped to [-1, 1] (near = -1), affine-invariant
L1 against the clamped metric depth, Marigold-protocol metrics after least-squares alignment.
Normals (§1.6, §2.2.2): decoded image L2-normalised per pixel (x left, y up, z towards the viewer), guarded
angular loss, DSINE-protocol metrics pooled over all valid pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.alignment import align_depth_lstsq
from lightning_modules.losses import affine_invariant_l1, angular_loss
from lightning_modules.metrics import DepthMetrics, NormalMetrics
from lightning_modules.visualize import depth_preview_row, normals_preview_row

TaskName = Literal["depth", "normals"]


class DepthTask:
    """Affine-invariant depth."""

    name = "depth"

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        """Three-channel image in [-1, 1] that the diffusion objective encodes as its target latent."""
        return batch["depth_norm"].repeat(1, 3, 1, 1)

    def from_decoded(self, decoded: Tensor) -> Tensor:
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Pixels the loss and the metrics count: the batch's validity mask."""
        return batch["mask"].bool()

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return affine_invariant_l1(prediction, batch["depth_target"], self.valid_mask(batch))

    def make_metrics(
        self, min_depth: float, max_depth: float, align_max_res: int | None = None, mask_gt_range: bool = True
    ) -> Metric:
        return DepthMetrics(min_depth, max_depth, align_max_res=align_max_res, mask_gt_range=mask_gt_range)

    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        metrics.update(prediction, batch["depth"], self.valid_mask(batch))

    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        mask = self.valid_mask(batch)[i : i + 1]
        aligned = align_depth_lstsq(prediction[i : i + 1].float(), batch["depth"][i : i + 1].float(), mask)
        return depth_preview_row(batch["rgb"][i], batch["depth"][i].cpu(), aligned[0].cpu(), mask[0].cpu())


class NormalsTask:
    """Camera-space surface normals."""

    name = "normals"

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["normals"]

    def from_decoded(self, decoded: Tensor) -> Tensor:
        decoded = decoded.float()
        return (decoded / (decoded.norm(dim=1, keepdim=True) + 1e-5)).clamp(-1.0, 1.0)

    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Valid pixels that also have a ground-truth normal: samples stored without normals (e.g. Virtual KITTI
        converted without them) carry zero normals, which would otherwise count as 90-degree errors."""
        return batch["mask"].bool() & (batch["normals"].norm(dim=1, keepdim=True) > 0.5)

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return angular_loss(prediction, batch["normals"], self.valid_mask(batch))

    def make_metrics(
        self, min_depth: float, max_depth: float, align_max_res: int | None = None, mask_gt_range: bool = True
    ) -> Metric:
        return NormalMetrics()

    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        metrics.update(prediction, batch["normals"], self.valid_mask(batch))

    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        mask = self.valid_mask({"mask": batch["mask"][i : i + 1], "normals": batch["normals"][i : i + 1]})[0]
        return normals_preview_row(batch["rgb"][i], batch["normals"][i].cpu(), prediction[i].cpu(), mask.cpu())


Task = DepthTask | NormalsTask


def build_task(name: str) -> Task:
    tasks = {"depth": DepthTask, "normals": NormalsTask}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; available: {sorted(tasks)}")
    return tasks[name]()


def valid_latent_mask(mask: Tensor, factor: int, channels: int) -> Tensor:
    """A latent cell is valid only if every pixel under it is valid (docs/method.md §2.1 step 2)."""
    invalid = torch.nn.functional.max_pool2d((~mask).float(), kernel_size=factor, stride=factor)
    return (invalid < 0.5).expand(-1, channels, -1, -1)
