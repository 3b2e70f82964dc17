"""The stand-in's text components and its folder in Stable Diffusion 2 layout (docs/standin.md).

The folder holds `unet/` (4 input channels), `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` (SD2's
DDIM config: v-prediction, scaled-linear betas, leading spacing as shipped) plus `model_index.json` of a
`StableDiffusionPipeline` without safety checker, so stock `StableDiffusionPipeline.from_pretrained(folder)`
loads it and `GeometryEstimator(pretrained=folder)` treats it exactly like `stabilityai/stable-diffusion-2`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_modules.tiny import default_text_encoder, write_byte_level_tokenizer

__all__ = ["default_text_encoder", "tiny_text_encoder", "byte_level_tokenizer", "save_sd2_folder"]


def tiny_text_encoder(config: dict[str, Any]) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**config))


def byte_level_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_byte_level_tokenizer(tmp))


def sd2_inference_scheduler() -> DDIMScheduler:
    """The scheduler config SD2 (768-v) ships: DDIM, v-prediction, no clipping, leading spacing with offset 1."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def save_sd2_folder(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    out_dir: str | Path,
) -> Path:
    """Write the components as a `StableDiffusionPipeline` folder and return its path."""
    if unet.config.in_channels != 4:
        raise ValueError(f"an SD2-layout UNet has 4 input channels, got {unet.config.in_channels}")
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd2_inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_tiny_sd2_folder(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model in SD2 layout (4-channel UNet): offline tests of the SD2 loading path."""
    from lightning_modules.tiny import TinySpec, build_tiny_components

    spec = TinySpec(seed=seed)
    spec.unet["in_channels"] = 4
    parts = build_tiny_components(spec)
    return save_sd2_folder(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, out_dir)
