"""Speed switches of the training and inference path (each a config choice; measured in docs/benchmarks.md).

`model.init_args.speed`: memory layout, the GroupNorm route, compilation and the optimiser implementation.
Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default processor under torch 2),
so no switch is needed for it; `attention_backend` states it and refuses anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OptimizerImpl = Literal["auto", "fused", "foreach", "for_loop"]


@dataclass
class SpeedSpec:
    """Args:
    channels_last: UNet and VAE weights and their inputs in NHWC memory layout (faster bf16 convolutions on
        recent GPUs and on CPUs with AMX, whose oneDNN kernels work in NHWC).
    contiguous_group_norm: on the CPU, GroupNorm of a channels-last bfloat16 / float16 activation that autograd
        tracks runs on a contiguous copy (`ContiguousGroupNorm`). PyTorch's channels-last CPU GroupNorm backward is
        several times slower than its contiguous one in bf16, and the VAE's attention hands its output on in
        channels-last strides, so every full-resolution decoder block of an E2E step hits it even with
        `channels_last` off. No effect on CUDA (its GroupNorm makes inputs contiguous itself), in float32, or
        without gradients (prediction).
    compile_unet: `torch.compile` the UNet in place (`nn.Module.compile`: state-dict keys unchanged); the first
        steps are slow while it compiles.
    optimizer_impl: AdamW implementation: `fused` (one kernel per step), `foreach` (multi-tensor), `for_loop` (per
        parameter, the reference's), `auto` = foreach. Not `fused` by default: Lightning's mixed-precision plugin
        refuses gradient clipping (`gradient_clip_val`, set in our trainer presets) with a fused optimizer.
    attention_backend: `sdpa` (PyTorch's fused attention; the only one offered).
    """

    channels_last: bool = False
    contiguous_group_norm: bool = True
    compile_unet: bool = False
    optimizer_impl: OptimizerImpl = "auto"
    attention_backend: Literal["sdpa"] = "sdpa"

    def __post_init__(self) -> None:
        if self.optimizer_impl not in ("auto", "fused", "foreach", "for_loop"):
            raise ValueError(f"optimizer_impl must be auto, fused, foreach or for_loop, got {self.optimizer_impl!r}")
        if self.attention_backend != "sdpa":
            raise ValueError(f"attention_backend must be 'sdpa', got {self.attention_backend!r}")


def is_channels_last(t: Tensor) -> bool:
    """NHWC strides that are not also NCHW-contiguous (a 1x1 kernel or a single channel is both)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class ContiguousGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, on the CPU under autograd, normalises a channels-last low-precision input through a
    contiguous copy and hands the result back channels-last (see `SpeedSpec.contiguous_group_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.requires_grad
            and torch.is_grad_enabled()
            and is_channels_last(x)
        ):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def route_group_norms(module: nn.Module, contiguous: bool) -> None:
    """Every plain nn.GroupNorm under `module` becomes a ContiguousGroupNorm (or back), in place; parameters and
    state-dict keys are untouched."""
    old, new = (nn.GroupNorm, ContiguousGroupNorm) if contiguous else (ContiguousGroupNorm, nn.GroupNorm)
    for child in module.modules():
        if type(child) is old:
            child.__class__ = new


def set_layout(core: nn.Module, channels_last: bool, contiguous_group_norm: bool) -> None:
    """Memory layout of the UNet and the VAE (`core.unet`, `core.vae`) and the GroupNorm route, in place."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for part in (core.unet, core.vae):
        part.to(memory_format=memory_format)
        route_group_norms(part, contiguous_group_norm)


def apply_to_core(core: nn.Module, spec: SpeedSpec) -> None:
    """Memory layout, GroupNorm route and compilation of a GeometryCore, in place."""
    set_layout(core, spec.channels_last, spec.contiguous_group_norm)
    if spec.compile_unet:
        core.unet.compile()


def adamw_options(parameters: Iterable[nn.Parameter], impl: OptimizerImpl) -> dict[str, Any]:
    """`torch.optim.AdamW` keywords selecting the implementation for parameters on their device."""
    if impl == "fused":
        devices = {p.device.type for p in parameters}
        if not devices <= {"cuda", "cpu", "mps", "xpu"}:  # what fused AdamW covers since torch 2.4 (our minimum)
            raise ValueError(f"fused AdamW does not support parameters on {sorted(devices)}; use foreach")
        return {"fused": True}
    if impl in ("foreach", "auto"):
        return {"foreach": True}
    return {"foreach": False, "fused": False}
