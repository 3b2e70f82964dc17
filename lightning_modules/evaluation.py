"""Evaluation protocol of a dataset (docs/method.md §6): prediction settings, ground-truth crop, input mode, tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.alignment import AlignDownsample
from lightning_modules.ensemble import DEPTH_ENSEMBLE_PRESETS

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
        depth_ensemble: name of the `DEPTH_ENSEMBLE_PRESETS` entry that fuses depth members when
            ensemble_size > 1: `diffusers` (reproduces the published ensembles), `exact_gradient`, `marigold_v1_0`
            (docs/method.md §5.5).
        min_depth, max_depth: clip range of aligned depth in metres, also the ground-truth range unless
            `mask_gt_range` is false (the one place an evaluation's depth range is set; the defaults suit the
            synthetic rooms and Hypersim-style validation).
        mask_gt_range: restrict depth metrics to ground truth inside (min_depth, max_depth); false for DIODE,
            whose range only clips predictions.
        align_max_res: fit the least-squares scale/shift on nearest-downsampled copies with this long edge
            (ETH3D: 1024); None = full resolution.
        align_downsample: how those copies are made: `upstream_width` subsamples only the width, as the
            published numbers did (docs/method.md §6.1); `isotropic` resizes both sides to long edge align_max_res.
        crop: evaluation crop (top, bottom, left, right) as fractions of height/width, rows int(top H) to
            int(bottom H), columns likewise (Eigen crop: NYUv2 45:471, 41:601; KITTI 117:321, 43:1172).
        input_mode: `exact` images, or `dsine_minmax`: ImageNet-normalised then min-max stretched to 8 bits over
            the whole image, as the published normal numbers were made (docs/method.md §6.2).
    """

    dataset: str = "val"
    task: str | None = None
    processing_resolution: int = 0
    ensemble_size: int = 1
    depth_ensemble: str = "diffusers"
    min_depth: float = 1e-3
    max_depth: float = 80.0
    mask_gt_range: bool = True
    align_max_res: int | None = None
    align_downsample: AlignDownsample = "upstream_width"
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
        if self.input_mode not in ("exact", "dsine_minmax"):
            raise ValueError(f"input_mode must be 'exact' or 'dsine_minmax', got {self.input_mode!r}")
        if self.depth_ensemble not in DEPTH_ENSEMBLE_PRESETS:
            raise ValueError(
                f"depth_ensemble must be one of {sorted(DEPTH_ENSEMBLE_PRESETS)}, got {self.depth_ensemble!r}"
            )
        if self.align_downsample not in ("upstream_width", "isotropic"):
            raise ValueError(f"align_downsample must be 'upstream_width' or 'isotropic', got {self.align_downsample!r}")


def crop_box(crop: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel box (top, bottom, left, right) of a fractional crop: int(top H) to int(bottom H), columns likewise."""
    return int(crop[0] * height), int(crop[1] * height), int(crop[2] * width), int(crop[3] * width)


def crop_mask(mask: Tensor, crop: tuple[float, float, float, float] | None) -> Tensor:
    """The mask [..., H, W] restricted to the crop box (unchanged without a crop)."""
    if crop is None:
        return mask
    top, bottom, left, right = crop_box(crop, *mask.shape[-2:])
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


PROTOCOL_TASKS = {"marigold_depth": "depth", "dsine_normals": "normals"}  # shards' eval_protocol -> task


def check_protocol(spec: EvalSpec | Mapping[str, Any], shard_metadata: Mapping[str, Any]) -> list[str]:
    """Disagreements between an evaluation spec and one evaluation sample's `eval_*` metadata; [] = consistent."""
    spec = spec if isinstance(spec, EvalSpec) else EvalSpec(**spec)
    meta, problems = shard_metadata, []
    task = PROTOCOL_TASKS.get(meta.get("eval_protocol"))
    if task is None:
        return [f"eval_protocol: shards have {meta.get('eval_protocol')!r}, expected one of {sorted(PROTOCOL_TASKS)}"]
    if spec.task not in (None, task):
        problems.append(f"task: spec {spec.task!r}, shards {meta['eval_protocol']!r} ({task})")
    if "eval_processing_resolution" in meta and meta["eval_processing_resolution"] != spec.processing_resolution:
        problems.append(
            f"processing_resolution: spec {spec.processing_resolution}, shards {meta['eval_processing_resolution']}"
        )
    alignment = "least_squares" if task == "depth" else "none"  # what the metrics of that task do
    if meta.get("eval_alignment", alignment) != alignment:
        problems.append(f"alignment: {task} metrics use {alignment!r}, shards {meta['eval_alignment']!r}")
    if spec.crop is not None and {"height", "width"} <= meta.keys():
        box = list(crop_box(spec.crop, meta["height"], meta["width"]))
        if meta.get("eval_crop") is None or list(meta["eval_crop"]) != box:
            problems.append(f"crop: spec box {box}, shards {meta.get('eval_crop')}")
    if task != "depth":
        return problems
    if "eval_alignment_max_res" in meta and meta["eval_alignment_max_res"] != spec.align_max_res:
        problems.append(f"align_max_res: spec {spec.align_max_res}, shards {meta['eval_alignment_max_res']}")
    for name, ours, key, unbounded in (
        ("min_depth", spec.min_depth, "eval_min_depth", 0.0), ("max_depth", spec.max_depth, "eval_max_depth", math.inf)
    ):  # fmt: skip
        if key not in meta:
            continue
        theirs = unbounded if meta[key] is None else float(meta[key])  # null = unbounded in the shards
        if not (ours == theirs or math.isclose(ours, theirs, rel_tol=1e-9)):
            problems.append(f"{name}: spec {ours}, shards {theirs}")
    # A file mask with a clip-only range (DIODE): masking ground truth by the range would drop valid pixels.
    if meta.get("eval_mask") == "file" and spec.mask_gt_range:
        problems.append("mask_gt_range: spec true, but the shards' mask comes from a file and the range only clips")
    return problems
