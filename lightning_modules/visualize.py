"""Preview grids for TensorBoard: RGB | ground truth | prediction | error, one row per image."""

from __future__ import annotations

import matplotlib
import torch
from torch import Tensor


def colorize(values: Tensor, vmin: float, vmax: float, cmap: str = "Spectral") -> Tensor:
    """Map a [H, W] tensor to an RGB [3, H, W] float tensor in [0, 1] with a matplotlib colormap."""
    normalized = ((values.float() - vmin) / max(vmax - vmin, 1e-8)).clamp(0, 1)
    colors = matplotlib.colormaps[cmap](normalized.cpu().numpy())[..., :3]
    return torch.from_numpy(colors).permute(2, 0, 1).float()


def depth_preview_row(rgb: Tensor, gt: Tensor, aligned: Tensor, mask: Tensor) -> Tensor:
    """One image's row: RGB, GT depth and aligned prediction (Spectral, near = red), AbsRel error map (gray=invalid)."""
    valid = mask[0]
    if valid.any():
        lo, hi = gt[0][valid].min().item(), gt[0][valid].max().item()
    else:
        lo, hi = 0.0, 1.0
    image = ((rgb.float().cpu() + 1) / 2).clamp(0, 1)
    gt_color = colorize(gt[0], lo, hi)
    pred_color = colorize(aligned[0], lo, hi)
    error = ((aligned[0] - gt[0]).abs() / gt[0].clamp_min(1e-6)).where(valid, torch.zeros_like(gt[0]))
    error_color = colorize(error, 0.0, 0.3, cmap="magma")
    invalid = (~valid).cpu()
    for panel in (gt_color, error_color):
        panel[:, invalid] = 0.5
    return torch.cat([image, gt_color, pred_color, error_color], dim=2)


def stack_rows(rows: list[Tensor]) -> Tensor:
    """Stack equally wide rows vertically (rows of different heights are padded at the bottom)."""
    width = max(r.shape[2] for r in rows)
    padded = [torch.nn.functional.pad(r, (0, width - r.shape[2])) for r in rows]
    return torch.cat(padded, dim=1)


def normals_to_rgb(normals: Tensor) -> Tensor:
    """Colour normals as (n + 1) / 2 (docs/method.md §5.6: [0, 0, 1] -> light blue)."""
    return ((normals.float() + 1) / 2).clamp(0, 1)


def normals_preview_row(rgb: Tensor, gt: Tensor, prediction: Tensor, mask: Tensor) -> Tensor:
    """One image's row: RGB, GT normals, predicted normals, angular error (0-45 degrees, gray = invalid)."""
    valid = mask[0]
    image = ((rgb.float().cpu() + 1) / 2).clamp(0, 1)
    cosine = torch.nn.functional.cosine_similarity(prediction.float(), gt.float(), dim=0).clamp(-1, 1)
    error = torch.rad2deg(torch.arccos(cosine)).where(valid, torch.zeros_like(cosine))
    error_color = colorize(error, 0.0, 45.0, cmap="magma")
    gt_color = normals_to_rgb(gt)
    for panel in (gt_color, error_color):
        panel[:, ~valid] = 0.5
    return torch.cat([image, gt_color, normals_to_rgb(prediction), error_color], dim=2)
