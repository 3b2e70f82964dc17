"""Speed switches of the training and inference path (each a config choice; measured in docs/benchmarks.md).

`model.init_args.speed`: memory layout, compilation and the optimiser implementation. Attention already runs
through PyTorch's scaled_dot_product_attention (diffusers' default processor under torch 2), so no switch is
needed for it; `attention_backend` states it and refuses anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

OptimizerImpl = Literal["auto", "fused", "foreach", "for_loop"]


@dataclass
class SpeedSpec:
    """Args:
    channels_last: UNet weights and inputs in NHWC memory layout (faster convolutions with bf16 on recent GPUs).
    compile_unet: `torch.compile` the UNet in place (`nn.Module.compile`: state-dict keys unchanged); the first
        steps are slow while it compiles.
    optimizer_impl: AdamW implementation: `fused` (one kernel per step), `foreach` (multi-tensor), `for_loop` (per
        parameter, the reference's), `auto` = foreach. Not `fused` by default: Lightning's mixed-precision plugin
        refuses gradient clipping (`gradient_clip_val`, set in our trainer presets) with a fused optimizer.
    attention_backend: `sdpa` (PyTorch's fused attention; the only one offered).
    """

    channels_last: bool = False
    compile_unet: bool = False
    optimizer_impl: OptimizerImpl = "auto"
    attention_backend: Literal["sdpa"] = "sdpa"

    def __post_init__(self) -> None:
        if self.optimizer_impl not in ("auto", "fused", "foreach", "for_loop"):
            raise ValueError(f"optimizer_impl must be auto, fused, foreach or for_loop, got {self.optimizer_impl!r}")
        if self.attention_backend != "sdpa":
            raise ValueError(f"attention_backend must be 'sdpa', got {self.attention_backend!r}")


def apply_to_unet(unet: nn.Module, spec: SpeedSpec) -> None:
    """Memory layout and compilation of the UNet, in place."""
    if spec.channels_last:
        unet.to(memory_format=torch.channels_last)
    if spec.compile_unet:
        unet.compile()


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
