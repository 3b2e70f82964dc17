"""The model core: frozen VAE, 8-channel UNet, cached empty-prompt embedding and the scheduler math.

Objectives, the predictor and export see only this `nn.Module` (and a task), never the LightningModule. The one
switch on the scheduler's prediction type is `PARAMETERIZATIONS` (docs/method.md §1.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from torch import Tensor, nn

from lightning_modules.components import (
    Components,
    ConvInRule,
    PromptPadding,
    empty_prompt_embedding,
    ensure_eight_channel_unet,
)
from lightning_modules.inference import InferenceSpec, inference_scheduler, initial_latent, sample_latent
from lightning_modules.speed import is_channels_last


@dataclass(frozen=True)
class Parameterization:
    """What the UNet output means: x0 from (ᾱ_t, z_t, output), and the regression target from (ᾱ_t, z_0, noise)."""

    x0: Callable[[Tensor, Tensor, Tensor], Tensor]
    target: Callable[[Tensor, Tensor, Tensor], Tensor]


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "v_prediction": Parameterization(
        x0=lambda a, z, out: a.sqrt() * z - (1 - a).sqrt() * out,
        target=lambda a, z0, noise: a.sqrt() * noise - (1 - a).sqrt() * z0,
    ),
    "epsilon": Parameterization(
        x0=lambda a, z, out: (z - (1 - a).sqrt() * out) / a.sqrt(),
        target=lambda a, z0, noise: noise,
    ),
    "sample": Parameterization(x0=lambda a, z, out: out, target=lambda a, z0, noise: z0),
}


def _like_weights(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`x` in channels-last layout when `conv`'s weights are (`SpeedSpec.channels_last`), else unchanged."""
    if is_channels_last(conv.weight):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class GeometryCore(nn.Module):
    """VAE + UNet + empty-prompt embedding of a Marigold-style model, with encode / denoise / x0 / decode.

    Args:
        parts: loaded or built components; the text encoder is used once, only its output is kept (a buffer, so
            it is saved with checkpoints).
        conv_in_rule: bias rule when a 4-channel (Stable Diffusion) conv_in is widened to 8 channels.
        prompt_padding: `none` (2-token empty prompt) or `max_length` (77 tokens).
        gradient_checkpointing: recompute UNet and VAE activations in the backward pass.
    """

    def __init__(
        self,
        parts: Components,
        conv_in_rule: ConvInRule = "e2e_ft",
        prompt_padding: PromptPadding = "none",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        ensure_eight_channel_unet(parts.unet, conv_in_rule)
        kind = parts.scheduler.config.prediction_type
        if kind not in PARAMETERIZATIONS:
            raise ValueError(f"unsupported prediction type {kind!r}; supported: {sorted(PARAMETERIZATIONS)}")
        self.unet: UNet2DConditionModel = parts.unet
        self.vae: AutoencoderKL = parts.vae.requires_grad_(False).eval()
        self.noise_scheduler: SchedulerMixin = parts.scheduler
        self.register_buffer(
            "empty_text_embedding", empty_prompt_embedding(parts.text_encoder, parts.tokenizer, prompt_padding)
        )
        if self.unet.config.cross_attention_dim != self.empty_text_embedding.shape[-1]:
            raise ValueError("text encoder hidden size does not match the UNet's cross_attention_dim")
        # ᾱ_t moves with the module (no host-to-device copy per step); not saved, it is the scheduler's.
        alphas = torch.as_tensor(self.noise_scheduler.alphas_cumprod, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", alphas, persistent=False)
        self._inference_schedulers: dict[str, Any] = {}
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_scale = float(self.vae.config.scaling_factor)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def train(self, mode: bool = True) -> GeometryCore:
        super().train(mode)
        self.vae.eval()  # frozen: no dropout or norm statistics change in training mode
        return self

    def encode(self, image: Tensor) -> Tensor:
        """Posterior mean of the frozen VAE encoder for images in [-1, 1], scaled (no sampling, no gradient).

        Runs under inference mode (no autograd bookkeeping at all); the result is cloned out of it only when
        autograd is on, since an inference tensor may not enter a graph that is differentiated.
        """
        with torch.inference_mode():
            latent = self.vae.encode(_like_weights(image, self.vae.encoder.conv_in)).latent_dist.mode()
            latent = latent * self.latent_scale
        return latent.clone() if torch.is_grad_enabled() else latent

    def decode(self, latent: Tensor) -> Tensor:
        """Frozen VAE decoder, kept in the autograd graph so task losses reach the UNet."""
        return self.vae.decode(_like_weights(latent / self.latent_scale, self.vae.decoder.conv_in)).sample

    def denoise(self, z_rgb: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Raw UNet output for [image latent, noisy target latent] at timesteps t with the empty prompt."""
        context = self.empty_text_embedding.expand(z_rgb.shape[0], -1, -1).to(z_rgb.dtype)
        x = _like_weights(torch.cat([z_rgb, z_t], dim=1), self.unet.conv_in)
        return self.unet(x, t, encoder_hidden_states=context).sample

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t [B,1,1,1] in float32 from the training scheduler."""
        return self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)  # a no-op move when t is on our device

    def predicted_original(self, output: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """x0 from the model output at timesteps t (computed in float32, returned in the output's dtype)."""
        rule = PARAMETERIZATIONS[self.prediction_type]
        return rule.x0(self.alpha_bar(t), z_t.float(), output.float()).to(output.dtype)

    def training_target(self, z_0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the UNet regresses at timesteps t (v, ε or x0 by prediction type), in float32."""
        rule = PARAMETERIZATIONS[self.prediction_type]
        return rule.target(self.alpha_bar(t), z_0.float(), noise.float())

    def add_noise(self, z_0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward diffusion q(z_t | z_0) of the training scheduler."""
        return self.noise_scheduler.add_noise(z_0, noise, t)

    @torch.no_grad()
    def sample(self, z_rgb: Tensor, spec: InferenceSpec) -> Tensor:
        """DDIM from the spec's initial latent to the predicted x0 latent (docs/method.md §5.2)."""
        scheduler = self._inference_schedulers.get(spec.spacing)
        if scheduler is None:  # built once per spacing: from_config costs more than a tiny model's UNet call
            scheduler = self._inference_schedulers[spec.spacing] = inference_scheduler(
                self.noise_scheduler, spec.spacing
            )
        z_init = initial_latent(z_rgb.shape, spec.init_latent, spec.seed, z_rgb.device, z_rgb.dtype)
        return sample_latent(lambda z, t: self.denoise(z_rgb, z, t), scheduler, z_init, spec.num_steps)
