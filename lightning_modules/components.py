"""Model components: loading from a diffusers folder / hub id, conv_in widening, empty-prompt embedding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

ConvInRule = Literal["marigold", "e2e_ft"]
PromptPadding = Literal["none", "max_length"]


@dataclass
class Components:
    """Everything a Marigold-style model is made of (the text encoder is only needed once)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler


def sd2_noise_scheduler(prediction_type: str = "v_prediction", zero_snr: bool = False) -> DDPMScheduler:
    """The SD2 training scheduler (docs/method.md §1.2) with clipping and thresholding explicitly off."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=False,
        steps_offset=1,
        rescale_betas_zero_snr=zero_snr,
    )


def load_pretrained_components(name_or_path: str) -> Components:
    """Load a Marigold (8-channel) or Stable Diffusion 2 (4-channel) checkpoint in diffusers layout."""
    try:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        scheduler_config = DDPMScheduler.load_config(name_or_path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        # jsonargparse shows only this message, not the chain: carry the cause (missing folder, no network, ...).
        where = (
            "the folder exists" if Path(name_or_path).is_dir() else "no such local folder, so it was tried as a hub id"
        )
        raise ValueError(
            f"Could not load a diffusers-format model from {name_or_path!r} ({where}): expected unet/, vae/, "
            f"text_encoder/, tokenizer/ and scheduler/ subfolders (offline? pass a local folder). Cause: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    # Missing keys would silently fall back to diffusers' defaults (clip_sample=True), see docs/method.md §9.9.
    scheduler = DDPMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False)
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def widen_conv_in(unet: UNet2DConditionModel, rule: ConvInRule) -> None:
    """Widen a 4-channel conv_in to 8 channels in place: weights tiled twice and halved (docs/method.md §1.3).

    `marigold` keeps the bias, `e2e_ft` halves it too. Input channel order: [image latent, target latent].
    """
    old = unet.conv_in
    if old.in_channels != 4:
        raise ValueError(f"conv_in widening expects 4 input channels, found {old.in_channels}")
    if rule not in ("marigold", "e2e_ft"):
        raise ValueError(f"unknown conv_in rule {rule!r}; use 'marigold' or 'e2e_ft'")
    new = nn.Conv2d(
        8,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, 2, 1, 1) * 0.5)
        if old.bias is not None:
            new.bias.copy_(old.bias * (0.5 if rule == "e2e_ft" else 1.0))
    unet.conv_in = new
    unet.register_to_config(in_channels=8)


def ensure_eight_channel_unet(unet: UNet2DConditionModel, rule: ConvInRule) -> None:
    """Accept a Marigold UNet (8 channels) as is; widen a Stable Diffusion UNet (4 channels)."""
    channels = unet.config.in_channels
    if channels == 4:
        widen_conv_in(unet, rule)
    elif channels != 8:
        raise ValueError(f"UNet has {channels} input channels; expected 4 (Stable Diffusion) or 8 (Marigold)")


@torch.no_grad()
def empty_prompt_embedding(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, padding: PromptPadding = "none"
) -> torch.Tensor:
    """Embed the empty prompt: [1, 2, D] ([BOS, EOS], the default, docs/method.md §2.3) or [1, 77, D] padded."""
    tokens = tokenizer(
        "",
        padding="max_length" if padding == "max_length" else "do_not_pad",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0].float()
