"""Camera-space surface normals, x left, y up, z towards the viewer (docs/method.md §1.6, §2.2.2, §5.5, §6.2).

Model and output conventions: the decoded image L2-normalised per pixel. Loss: guarded angular loss. Metrics:
DSINE protocol pooled over all valid pixels. Export: `MarigoldNormalsPipeline` (`use_full_z_range`).

`use_full_z_range=False` is the convention of stock Marigold normals folders whose model_index.json says so: the
decoded z channel in [-1, 1] stands for z in [0, 1] (surfaces facing away from the camera cannot be predicted).
`from_decoded` then decodes exactly as `MarigoldNormalsPipeline.decode_prediction` does (clip to [-1, 1], z -> z / 2
+ 1/2, divide by max(norm, 1e-6)), and `target_image` applies the inverse z -> 2 z - 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.ensemble import ensemble_normals
from lightning_modules.evaluation import EvalSpec
from lightning_modules.image_io import normals_files, uncertainty_file, write_normals, write_uncertainty
from lightning_modules.losses import angular_loss
from lightning_modules.metrics import NormalMetrics
from lightning_modules.tasks.base import Task, register_task, resize_bilinear
from lightning_modules.visualize import normals_preview_row


@register_task
class NormalsTask(Task):
    """Camera-space surface normals."""

    name = "normals"
    columns = (
        ("mean", "mean (°)", 1), ("median", "median (°)", 1), ("rmse", "RMSE (°)", 1), ("a5", "< 5° (%)", 1),
        ("a7_5", "< 7.5° (%)", 1), ("a11_25", "< 11.25° (%)", 1), ("a22_5", "< 22.5° (%)", 1), ("a30", "< 30° (%)", 1),
    )  # fmt: skip
    pipeline_output = "[1,H,W,3] unit normals, x left, y up, z out"
    pipeline = ("MarigoldNormalsPipeline", {"prediction_type": "normals", "use_full_z_range": True})

    def __init__(self, use_full_z_range: bool = True) -> None:
        self.use_full_z_range = bool(use_full_z_range)
        # exported folders say which z convention the model was trained with
        self.pipeline = (
            "MarigoldNormalsPipeline",
            {"prediction_type": "normals", "use_full_z_range": self.use_full_z_range},
        )

    @classmethod
    def folder_options(cls, index: dict[str, Any]) -> dict[str, Any]:
        # diffusers passes the stored value as is: absent -> the constructor default True, null -> falsy (half range)
        return {"use_full_z_range": bool(index.get("use_full_z_range", True))}

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        normals = batch["normals"]
        if self.use_full_z_range:
            return normals
        return torch.cat([normals[:, :2], (2 * normals[:, 2:] - 1).clamp(-1.0, 1.0)], dim=1)

    def from_decoded(self, decoded: Tensor) -> Tensor:
        decoded = decoded.float()
        if not self.use_full_z_range:
            # MarigoldNormalsPipeline.decode_prediction, in its order: clip, map z to [0, 1], normalise.
            clipped = decoded.clamp(-1.0, 1.0)
            halved = torch.cat([clipped[:, :2], clipped[:, 2:] * 0.5 + 0.5], dim=1)
            return halved / halved.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return (decoded / (decoded.norm(dim=1, keepdim=True) + 1e-5)).clamp(-1.0, 1.0)

    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Valid pixels that also have a ground-truth normal: samples stored without normals (e.g. Virtual KITTI
        converted without them) carry zero normals, which would otherwise count as 90-degree errors."""
        return batch["mask"].bool() & (batch["normals"].norm(dim=1, keepdim=True) > 0.5)

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return angular_loss(prediction, batch["normals"], self.valid_mask(batch))

    def make_metrics(self, protocol: EvalSpec) -> Metric:
        return NormalMetrics()

    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        metrics.update(prediction, batch["normals"], self.valid_mask(batch))

    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        mask = self.valid_mask({"mask": batch["mask"][i : i + 1], "normals": batch["normals"][i : i + 1]})[0]
        return normals_preview_row(batch["rgb"][i], batch["normals"][i].cpu(), prediction[i].cpu(), mask.cpu())

    def to_output(self, prediction: Tensor) -> Tensor:
        return prediction.float()

    def ensemble(self, members: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return ensemble_normals(members, **options)

    def resize_output(self, prediction: Tensor, size: tuple[int, int]) -> Tensor:
        return F.normalize(resize_bilinear(prediction, size), dim=1, eps=1e-6)

    def write_outputs(self, stem: str | Path, prediction: Tensor, uncertainty: Tensor | None) -> list[Path]:
        paths = write_normals(stem, prediction)
        return paths + ([write_uncertainty(stem, uncertainty[0])] if uncertainty is not None else [])

    def output_files(self, stem: str | Path, with_uncertainty: bool) -> list[Path]:
        return normals_files(stem) + ([uncertainty_file(stem)] if with_uncertainty else [])
