"""Tiny, randomly initialised Marigold-style components built from config (no download).

Used by the demo and the tests. Architectures follow docs/method.md §7.4, except the VAE downsamples 8x like the
real SD VAE (a 2x VAE makes the UNet's attention cost explode at 128 px, see docs/dependencies.md).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_modules.components import Components, sd2_noise_scheduler

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def default_unet() -> dict[str, Any]:
    return dict(
        in_channels=8,
        out_channels=4,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def default_vae() -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 32, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )


def default_text_encoder() -> dict[str, Any]:
    """The tiny CLIP text encoder (hidden size 32 = the tiny UNet's cross-attention width)."""
    return dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=514,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


@dataclass
class TinySpec:
    """Architecture of the tiny model: diffusers/transformers config keys per component, plus a seed."""

    seed: int = 0
    unet: dict[str, Any] = field(default_factory=default_unet)
    vae: dict[str, Any] = field(default_factory=default_vae)
    text_encoder: dict[str, Any] = field(default_factory=default_text_encoder)
    prediction_type: str = "v_prediction"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_byte_level_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP tokenizer whose vocabulary is the 256 byte symbols (+ `</w>` forms) and BOS/EOS."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = dict(model_max_length=77, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_tiny_components(spec: TinySpec) -> Components:
    """Build UNet, VAE, text encoder, tokenizer and scheduler, initialised deterministically from `spec.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_byte_level_tokenizer(tmp))
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd2_noise_scheduler(prediction_type=spec.prediction_type),
    )
