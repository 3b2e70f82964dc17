"""Affine-invariant depth (docs/method.md §1.6, §2.2.1, §5.5, §5.6, §6.1).

Model conventions: channel mean of the decoded image clamped to [-1, 1] (near = -1). Output conventions: [0, 1],
0 = near. Loss: affine-invariant L1 against the clamped metric depth. Metrics: Marigold protocol after
least-squares alignment. Export: `MarigoldDepthPipeline` (scale- and shift-invariant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torchmetrics import Metric

from lightning_modules.alignment import align_depth_lstsq
from lightning_modules.ensemble import DEPTH_ENSEMBLE_PRESETS, ensemble_depth
from lightning_modules.evaluation import EvalSpec
from lightning_modules.image_io import depth_files, uncertainty_file, write_depth, write_uncertainty
from lightning_modules.losses import affine_invariant_l1
from lightning_modules.metrics import DepthMetrics
from lightning_modules.tasks.base import Task, register_task, resize_bilinear
from lightning_modules.visualize import depth_preview_row


@register_task
class DepthTask(Task):
    """Affine-invariant depth."""

    name = "depth"
    needs_normals = False
    columns = (
        ("abs_rel", "AbsRel (%)", 100), ("sq_rel", "SqRel", 1), ("rmse", "RMSE", 1), ("rmse_log", "RMSE log", 1),
        ("log10", "log10", 1), ("delta1", "δ1 (%)", 100), ("delta2", "δ2 (%)", 100), ("delta3", "δ3 (%)", 100),
        ("i_rmse", "iRMSE", 1), ("silog", "SIlog", 1),
    )  # fmt: skip
    pipeline_output = "[1,H,W,1] affine-invariant depth in [0,1], 0 = near"
    pipeline = ("MarigoldDepthPipeline", {"prediction_type": "depth", "scale_invariant": True, "shift_invariant": True})

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["depth_norm"].repeat(1, 3, 1, 1)

    def from_decoded(self, decoded: Tensor) -> Tensor:
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def valid_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["mask"].bool()

    def loss(self, prediction: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return affine_invariant_l1(prediction, batch["depth_target"], self.valid_mask(batch))

    def make_metrics(self, protocol: EvalSpec) -> Metric:
        return DepthMetrics(
            protocol.min_depth, protocol.max_depth, align_max_res=protocol.align_max_res,
            mask_gt_range=protocol.mask_gt_range, align_downsample=protocol.align_downsample,
        )  # fmt: skip

    def update_metrics(self, metrics: Metric, prediction: Tensor, batch: dict[str, Tensor]) -> None:
        metrics.update(prediction, batch["depth"], self.valid_mask(batch))

    def preview_row(self, prediction: Tensor, batch: dict[str, Tensor], i: int) -> Tensor:
        mask = self.valid_mask(batch)[i : i + 1]
        aligned = align_depth_lstsq(prediction[i : i + 1].float(), batch["depth"][i : i + 1].float(), mask)
        return depth_preview_row(batch["rgb"][i], batch["depth"][i].cpu(), aligned[0].cpu(), mask[0].cpu())

    def to_output(self, prediction: Tensor) -> Tensor:
        return (prediction.float() + 1) / 2

    def ensemble_options(self, protocol: EvalSpec) -> dict[str, Any]:
        """The protocol's solver preset (default `diffusers`, reproducing the published ensembles), median fusion."""
        return {"reduction": "median", **DEPTH_ENSEMBLE_PRESETS[protocol.depth_ensemble]}

    def ensemble(self, members: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return ensemble_depth(members, **options)

    def resize_output(self, prediction: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_bilinear(prediction, size).clamp(0, 1)

    def write_outputs(self, stem: str | Path, prediction: Tensor, uncertainty: Tensor | None) -> list[Path]:
        paths = write_depth(stem, prediction[0])
        return paths + ([write_uncertainty(stem, uncertainty[0])] if uncertainty is not None else [])

    def output_files(self, stem: str | Path, with_uncertainty: bool) -> list[Path]:
        return depth_files(stem) + ([uncertainty_file(stem)] if with_uncertainty else [])
