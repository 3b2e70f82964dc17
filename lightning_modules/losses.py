"""E2E fine-tuning task losses, always computed in float32 (docs/method.md §2.2.1, §2.2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.alignment import least_squares_scale_shift

__all__ = ["affine_invariant_l1", "angular_loss", "least_squares_scale_shift"]


def affine_invariant_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Pooled mean over all valid pixels of |s_i·pred + t_i − target| with per-image least-squares s_i, t_i.

    pred: [B,1,H,W] clamped prediction; target: [B,1,H,W] metric depth; mask: bool [B,1,H,W]. The sum is divided
    by the total valid count of the batch (not a mean of per-image means). An all-empty mask gives 0 that is
    still connected to pred's graph.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        m = mask.bool().expand_as(pred)
        p, g = torch.where(m, pred.float(), 0), torch.where(m, target.float(), 0)
        s, t = least_squares_scale_shift(p, g, m)
        shape = (-1,) + (1,) * (p.dim() - 1)
        residual = torch.where(m, s.view(shape) * p + t.view(shape) - g, 0)
        return residual.abs().sum() / m.sum().clamp(min=1)


def angular_loss(pred: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean over valid pixels of arccos(clamp(n̂·n*, −1+eps, 1−eps)) in radians; [B,3,H,W] normals, mask [B,1,H,W].

    Both inputs are (re)normalised here (idempotent for an already unit pred), so the loss is a true angle.
    The clamp margin keeps the gradient finite (zero) where pred == ±target. Empty mask gives 0 with grad_fn.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        m = mask.bool()
        n_hat = F.normalize(torch.where(m, pred.float(), 0), dim=1, eps=1e-12)
        n_star = F.normalize(torch.where(m, target.float(), 0), dim=1, eps=1e-12)
        cos = (n_hat * n_star).sum(dim=1, keepdim=True).clamp(-1 + eps, 1 - eps)
        angle = torch.where(m, torch.acos(cos), 0)
        return angle.sum() / m.sum().clamp(min=1)
