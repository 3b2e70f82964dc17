"""The benchmarked architectures, built from config with random weights: the project's tiny model and SD2 size."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_modules.components import Components, sd2_noise_scheduler
from lightning_modules.core import GeometryCore
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import Objective
from lightning_modules.standin_folder import byte_level_tokenizer
from lightning_modules.tasks import Task, build_task
from lightning_modules.tiny import TinySpec, build_tiny_components, default_text_encoder

Arch = Literal["tiny", "sd2"]
ARCHS: tuple[str, ...] = ("tiny", "sd2")


def sd2_unet_config() -> dict[str, Any]:
    """`stabilityai/stable-diffusion-2`'s UNet config (4 input channels; GeometryCore widens conv_in to 8)."""
    return dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2,
        attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        norm_num_groups=32,
        sample_size=96,
    )


def sd2_vae_config() -> dict[str, Any]:
    """The SD (2) VAE config: 8x downsampling, 4 latent channels, scaling factor 0.18215."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=768,
    )


def sd2_text_encoder_config() -> dict[str, Any]:
    """A one-layer CLIP text encoder of SD2's hidden size 1024 (only its empty-prompt output is used)."""
    return {**default_text_encoder(), "hidden_size": 1024, "intermediate_size": 256, "num_hidden_layers": 1}


def build_components(arch: Arch, seed: int = 0) -> Components:
    """Random-weight components of `arch` on the current default device (no download)."""
    if arch == "tiny":
        return build_tiny_components(TinySpec(seed=seed))
    if arch != "sd2":
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**sd2_unet_config())
        vae = AutoencoderKL(**sd2_vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd2_text_encoder_config()))
    return Components(unet, vae, text_encoder, byte_level_tokenizer(), sd2_noise_scheduler())


@dataclass
class BenchModel:
    """A model core with its task and the text components the core dropped (needed to export it)."""

    arch: str
    core: GeometryCore
    task: Task
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer

    def parameters_m(self) -> float:
        """Trainable (UNet) parameters in millions."""
        return sum(p.numel() for p in self.core.unet.parameters()) / 1e6

    def save_text_components(self, folder: str | Path) -> Path:
        """`text_encoder/` and `tokenizer/` under `folder`, the `tokenizer_source` export needs."""
        folder = Path(folder)
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        return folder


def build_model(arch: Arch, device: torch.device, seed: int = 0, task: str = "depth") -> BenchModel:
    """Build `arch` directly on `device` (fast random init on a GPU) and wrap it in a `GeometryCore`."""
    with torch.device(device) if device.type != "cpu" else nullcontext():
        parts = build_components(arch, seed)
        core = GeometryCore(parts, conv_in_rule="e2e_ft")
    return BenchModel(arch, core.to(device), build_task(task), parts.text_encoder.cpu(), parts.tokenizer)


def set_checkpointing(core: GeometryCore, enabled: bool) -> None:
    """Switch gradient checkpointing of the UNet and the VAE, as `GeometryCore(gradient_checkpointing=...)` does."""
    for part in (core.unet, core.vae):
        if enabled:
            part.enable_gradient_checkpointing()
        else:
            part.disable_gradient_checkpointing()


def estimator_for(core: GeometryCore, objective: Objective, task: str = "depth") -> GeometryEstimator:
    """Our LightningModule around an existing core: built from the tiny spec, then its core replaced (shared)."""
    module = GeometryEstimator(objective=objective, tiny=TinySpec(), task=task, warmup_steps=0)
    module.core = core
    return module
