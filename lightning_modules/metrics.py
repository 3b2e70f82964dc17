"""Evaluation metrics as torchmetrics `Metric`s with sum-reduced states (docs/method.md §6.1 depth, §6.2 normals).

Both expose `scored_images`: how many images this process has scored so far (images with at least one valid pixel;
a local state, not synced), which `GeometryEstimator` counts as `val/images` / `test/images`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_modules.alignment import AlignDownsample, align_depth_lstsq

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")
NORMAL_METRICS = ("mean", "median", "rmse", "a5", "a7_5", "a11_25", "a22_5", "a30")
NORMAL_THRESHOLDS = (5.0, 7.5, 11.25, 22.5, 30.0)


class DepthMetrics(Metric):
    """Marigold-protocol depth metrics: per-image alignment, clipping, metrics; dataset score = mean over images.

    Valid pixels are mask ∧ finite gt ∧ min_depth < gt < max_depth (the range test can be switched off with
    mask_gt_range=False for DIODE, whose range only clips predictions). Images without a valid pixel are skipped
    and counted in `skipped`. With align_max_res the fit uses copies downsampled by `align_downsample` (see
    align_depth_lstsq; `upstream_width`, the default, is how the published numbers were made). States are sums
    of per-image values (float64) plus the image count, so they reduce by sum under DDP.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        min_depth: float,
        max_depth: float,
        alignment: Literal["least_squares", "none"] = "least_squares",
        align_max_res: int | None = None,
        mask_gt_range: bool = True,
        align_downsample: AlignDownsample = "upstream_width",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        if alignment not in ("least_squares", "none"):
            raise ValueError(f"alignment must be 'least_squares' or 'none', got {alignment!r}")
        if align_max_res is not None and align_max_res < 1:
            raise ValueError(f"align_max_res must be a positive int or None, got {align_max_res}")
        if align_downsample not in ("upstream_width", "isotropic"):
            raise ValueError(f"align_downsample must be 'upstream_width' or 'isotropic', got {align_downsample!r}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.alignment, self.align_max_res, self.mask_gt_range = alignment, align_max_res, mask_gt_range
        self.align_downsample = align_downsample
        self.add_state("sums", torch.zeros(len(DEPTH_METRICS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, gt: Tensor, mask: Tensor) -> None:
        """Accumulate one batch: pred [B,1,H,W] affine-arbitrary depth, gt [B,1,H,W] metres, mask bool [B,1,H,W]."""
        with torch.autocast(device_type=pred.device.type, enabled=False):
            p, g = pred.detach().float(), gt.detach().float()
            m = mask.bool().expand_as(g) & torch.isfinite(g)
            if self.mask_gt_range:
                m = m & (g > self.min_depth) & (g < self.max_depth)
            dims = tuple(range(1, g.dim()))
            n = m.sum(dims)
            if self.alignment == "least_squares":
                p = align_depth_lstsq(p, g, m, self.align_max_res, self.align_downsample)
            p = torch.where(m, p.clamp(self.min_depth, self.max_depth).clamp(min=1e-6), 1)
            g = torch.where(m, g, 1)
            n_safe = n.clamp(min=1).float()

            def mean(x: Tensor) -> Tensor:
                return torch.where(m, x, 0).sum(dims) / n_safe

            sq = (p - g) ** 2
            e = torch.log(p) - torch.log(g)
            ratio = torch.maximum(p / g, g / p)
            mse_log = mean(e**2)
            values = torch.stack(
                [
                    mean((p - g).abs() / g),
                    mean(sq / g),
                    mean(sq).sqrt(),
                    mse_log.sqrt(),
                    mean(e.abs()) / math.log(10),
                    *(mean((ratio < 1.25**k).float()) for k in (1, 2, 3)),
                    mean((1 / p - 1 / g) ** 2).sqrt(),
                    100 * (mse_log - mean(e) ** 2).clamp(min=0).sqrt(),
                ],
                dim=1,
            )
            keep = n > 0
            self.sums += values[keep].double().sum(0)
            self.count += keep.sum()
            self.skipped += (~keep).sum()

    @property
    def scored_images(self) -> Tensor:
        """Images scored so far by this process (at least one valid pixel), unsynced."""
        return self.count

    def compute(self) -> dict[str, Tensor]:
        """Mean over evaluated images of each metric (NaN if no image was evaluated)."""
        means = (self.sums / self.count.clamp(min=1)).float()
        if self.count == 0:
            means = torch.full_like(means, float("nan"))
        return dict(zip(DEPTH_METRICS, means.unbind()))


class NormalMetrics(Metric):
    """DSINE-protocol angular errors pooled over all valid pixels of the dataset (not per-image means).

    Error e = angle between n̂ and n* in degrees, computed as atan2(‖n̂×n*‖, n̂·n*) on normalised vectors
    (equal to arccos(clamp(cos_sim, −1, 1)) but accurate near 0° and 180° in float32); a zero-length vector
    counts as 90° like cos_sim = 0. The median comes from a sum-reduced histogram of 0.01° bins: it is the
    lower median (rank ⌈N/2⌉, torch.median convention) reported at its bin centre, i.e. within 0.005°.
    Threshold values (a5 … a30, strict <) are percentages. `images` counts the images with at least one valid pixel.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    bin_width = 0.01
    num_bins = 18000

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sum_e", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_e2", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("below", torch.zeros(len(NORMAL_THRESHOLDS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def scored_images(self) -> Tensor:
        """Images scored so far by this process (at least one valid pixel), unsynced."""
        return self.images

    def update(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        """Accumulate one batch: pred and target [B,3,H,W] normals, mask bool [B,1,H,W]."""
        with torch.autocast(device_type=pred.device.type, enabled=False):
            a, b = pred.detach().float(), target.detach().float()
            zero = (a.norm(dim=1) < 1e-12) | (b.norm(dim=1) < 1e-12)
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            sin = torch.linalg.cross(a, b, dim=1).norm(dim=1)
            angle = torch.rad2deg(torch.atan2(sin, (a * b).sum(dim=1)))
            valid = mask.bool().reshape(angle.shape)
            e = torch.where(zero, 90.0, angle)[valid]
            idx = (e / self.bin_width).long().clamp(0, self.num_bins - 1)
            self.hist += torch.bincount(idx, minlength=self.num_bins)
            self.sum_e += e.double().sum()
            self.sum_e2 += (e.double() ** 2).sum()
            self.below += torch.stack([(e < th).sum() for th in NORMAL_THRESHOLDS])
            self.count += e.numel()
            self.images += valid.flatten(1).any(1).sum()

    def compute(self) -> dict[str, Tensor]:
        """Pooled mean, median, RMSE (degrees) and threshold percentages (NaN if no pixel was seen)."""
        n = self.count.clamp(min=1).double()
        rank = (self.count + 1) // 2
        median_bin = torch.searchsorted(self.hist.cumsum(0), rank.view(1)).squeeze(0)
        values = torch.stack(
            [
                self.sum_e / n,
                (median_bin.double() + 0.5) * self.bin_width,
                (self.sum_e2 / n).sqrt(),
                *(100 * self.below.double() / n).unbind(),
            ]
        ).float()
        if self.count == 0:
            values = torch.full_like(values, float("nan"))
        return dict(zip(NORMAL_METRICS, values.unbind()))
