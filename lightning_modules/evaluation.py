"""Evaluation protocol of a dataset (docs/method.md §6): prediction settings, ground-truth crop, input mode, tables."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

InputMode = Literal["exact", "dsine_minmax"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EvalSpec:
    """How validation and test evaluate (docs/method.md §6.1 depth, §6.2 normals); the model's `evaluation` argument.

    Args:
        dataset: name in the metric tables (`metrics_<dataset>.csv` / `.md`).
        task: `depth` or `normals` if the protocol is for one task only: a model of the other task is an error.
        processing_resolution: long edge the image is resized to for prediction; 0 = native (padded to 8).
        ensemble_size: predictions per image, fused as in `experiments.infer` (1 for E2E models).
        min_depth, max_depth: clip range of aligned depth, also the ground-truth range unless `mask_gt_range` is
            false; None = the model's `eval_min_depth` / `eval_max_depth`.
        mask_gt_range: restrict depth metrics to ground truth inside (min_depth, max_depth); false for DIODE,
            whose range only clips predictions.
        align_max_res: fit the least-squares scale/shift on nearest-downsampled copies with this long edge
            (ETH3D: 1024); None = full resolution.
        crop: evaluation crop (top, bottom, left, right) as fractions of height/width, rows int(top H) to
            int(bottom H), columns likewise (Eigen crop: NYUv2 45:471, 41:601; KITTI 117:321, 43:1172).
        input_mode: `exact` images, or `dsine_minmax`: ImageNet-normalised then min-max stretched to 8 bits over
            the whole image, as the published normal numbers were made (docs/method.md §6.2).
    """

    dataset: str = "val"
    task: Literal["depth", "normals"] | None = None
    processing_resolution: int = 0
    ensemble_size: int = 1
    min_depth: float | None = None
    max_depth: float | None = None
    mask_gt_range: bool = True
    align_max_res: int | None = None
    crop: tuple[float, float, float, float] | None = None
    input_mode: InputMode = "exact"

    def __post_init__(self) -> None:
        if not self.dataset or any(c in self.dataset for c in "/\\"):
            raise ValueError(f"evaluation dataset name {self.dataset!r} must be non-empty without path separators")
        if self.processing_resolution < 0 or self.ensemble_size < 1:
            raise ValueError(
                f"need processing_resolution >= 0 and ensemble_size >= 1, got {self.processing_resolution}, "
                f"{self.ensemble_size}"
            )
        if self.crop is not None:
            top, bottom, left, right = self.crop
            if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
                raise ValueError(
                    f"crop (top, bottom, left, right) needs 0 <= top < bottom <= 1 and 0 <= left < right <= 1, "
                    f"got {self.crop}"
                )
        if self.task not in (None, "depth", "normals"):
            raise ValueError(f"task must be 'depth', 'normals' or None, got {self.task!r}")
        if self.input_mode not in ("exact", "dsine_minmax"):
            raise ValueError(f"input_mode must be 'exact' or 'dsine_minmax', got {self.input_mode!r}")


def crop_mask(mask: Tensor, crop: tuple[float, float, float, float] | None) -> Tensor:
    """The mask [..., H, W] restricted to the crop box (unchanged without a crop)."""
    if crop is None:
        return mask
    height, width = mask.shape[-2:]
    top, bottom = int(crop[0] * height), int(crop[1] * height)
    left, right = int(crop[2] * width), int(crop[3] * width)
    box = torch.zeros_like(mask, dtype=torch.bool)
    box[..., top:bottom, left:right] = True
    return mask.bool() & box


def prepare_input(images: Tensor, mode: InputMode) -> Tensor:
    """Network input [B,3,H,W] in [0, 1] from images in [0, 1] by the protocol's input mode."""
    if mode == "exact":
        return images
    if mode != "dsine_minmax":
        raise ValueError(f"unknown input mode {mode!r}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    stretched = (x - low) / (high - low).clamp_min(1e-12)
    return torch.floor(stretched * 255) / 255  # the reference truncates to uint8


def write_tables(
    folder: str | Path, dataset: str, images: int, values: dict[str, float], columns: Sequence[tuple[str, str, float]]
) -> tuple[Path, Path]:
    """Write `metrics_<dataset>.csv` (raw values, full precision) and `.md` (the task's `columns`: key, header,
    factor, in the papers' units) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"metrics_{dataset}.csv", folder / f"metrics_{dataset}.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "images", *values])
        writer.writerow([dataset, images, *(repr(float(v)) for v in values.values())])
    columns = [c for c in columns if c[0] in values]
    cells = ["nan" if math.isnan(values[key]) else f"{values[key] * factor:.3f}" for key, _, factor in columns]
    lines = [
        "| dataset | images | " + " | ".join(header for _, header, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
        f"| {dataset} | {images} | " + " | ".join(cells) + " |",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
