"""Model components: loading from a diffusers folder / hub id, conv_in widening, empty-prompt embedding."""

from __future__ import annotations

import os
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


SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LAYOUT = "unet/, vae/, text_encoder/, tokenizer/ and scheduler/ subfolders and a model_index.json"


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only mean a local folder, never a hub id (`owner/name`): absolute, starting with `.` or
    `~`, with more than one separator, without any (hub model ids have an owner), or whose first part exists here."""
    if os.path.isabs(name) or name.startswith((".", "~")):
        return True
    separators = name.count("/") + (name.count(os.sep) if os.sep != "/" else 0)
    if separators != 1:
        return True
    return Path(name.split("/")[0]).exists()


def check_model_source(name_or_path: str, subfolders: tuple[str, ...] = SUBFOLDERS) -> None:
    """Refuse, before anything is loaded, a local model path that does not exist or is not a diffusers folder.

    A missing local path is never tried as a hub id (that would mean minutes of network retries for a typo);
    an existing folder must have every one of `subfolders` (what the loader reads), and the message names the
    missing ones.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = [f"{name}/" for name in subfolders if not (path / name).is_dir()]
        if missing:
            raise ValueError(
                f"{name_or_path!r} is not a diffusers model folder: it lacks {', '.join(missing)} "
                f"(expected {LAYOUT}, as `save_pretrained` of a Marigold or Stable Diffusion pipeline writes)"
            )
    elif path.exists():
        raise ValueError(
            f"{name_or_path!r} is a file, not a diffusers model folder (expected a folder with {LAYOUT}; "
            "a Lightning checkpoint is loaded with --ckpt_path, or as infer's --model)"
        )
    elif name_or_path.startswith("standin:"):
        raise ValueError(
            f"{name_or_path!r} names the SD2 stand-in, which the experiments CLI resolves to its cache folder; "
            "outside it pass the folder itself (`python -m experiments.standin` prints it)"
        )
    elif looks_like_local_path(name_or_path):
        raise ValueError(
            f"model folder {name_or_path!r} does not exist (resolved: {path.resolve()}); it is a local path, so it "
            f"was not tried as a hub id. Expected a folder with {LAYOUT}; hub models are named owner/name."
        )


def load_pretrained_components(name_or_path: str) -> Components:
    """Load a Marigold (8-channel) or Stable Diffusion 2 (4-channel) checkpoint in diffusers layout.

    `name_or_path` is a local folder or a hub id (`owner/name`); a local path that does not exist, or a folder
    without one of the subfolders, is refused at once (`check_model_source`).
    """
    check_model_source(name_or_path)
    source = str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError) as err:
        # jsonargparse shows only this message, not the chain: carry the cause (broken file, no network, ...).
        where = "the folder exists" if Path(source).is_dir() else "no such local folder, so it was tried as a hub id"
        raise ValueError(
            f"Could not load a diffusers-format model from {name_or_path!r} ({where}): expected {LAYOUT} "
            f"(offline? pass a local folder). Cause: "
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
