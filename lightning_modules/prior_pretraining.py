"""Stand-in for Stable Diffusion 2's UNet: pretrain an image prior that denoises autoencoder latents (docs/standin.md).

A 4-input-channel `UNet2DConditionModel` learns DDPM denoising of RGB latents with SD2's noise schedule and
v-prediction, conditioned on the cached embedding of the empty prompt. Like SD2 itself, the prior sees the
prompt padded to 77 tokens (what `StableDiffusionPipeline` feeds it); Marigold-style fine-tuning later uses the
unpadded 2-token embedding, the same mismatch the real SD2 -> Marigold path has (docs/standin.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor

from lightning_modules.components import empty_prompt_embedding, sd2_noise_scheduler
from lightning_modules.inference import inference_scheduler, sample_latent
from lightning_modules.objectives import masked_mse
from lightning_modules.padding import drop_padding
from lightning_modules.standin_folder import byte_level_tokenizer, default_text_encoder, tiny_text_encoder
from lightning_modules.tiny import default_unet
from lightning_modules.visualize import stack_rows


def default_prior_unet() -> dict[str, Any]:
    """The tiny UNet with SD2's 4 latent input channels (the estimator later widens conv_in to 8)."""
    return dict(default_unet(), in_channels=4)


class ImagePriorPretraining(L.LightningModule):
    """Train the stand-in text-to-image UNet on latents of the stand-in autoencoder (frozen).

    Args:
        autoencoder: folder of the pretrained `AutoencoderKL` (diffusers `save_pretrained` layout).
        unet: `UNet2DConditionModel` config keys (4 input channels; default `default_prior_unet()`).
        text_encoder: `CLIPTextConfig` keys of the frozen, randomly initialised text encoder (hidden size =
            the UNet's `cross_attention_dim`); only its embedding of "" is used.
        lr, warmup_steps: AdamW learning rate with a linear warm-up.
        sample_steps: DDIM (trailing) steps for the sample grid logged at each validation.
        seed: initialisation seed of the UNet and the text encoder.
    """

    def __init__(
        self,
        autoencoder: str,
        unet: dict[str, Any] | None = None,
        text_encoder: dict[str, Any] | None = None,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        sample_steps: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not (Path(autoencoder) / "config.json").is_file():
            raise FileNotFoundError(f"no pretrained autoencoder at {autoencoder!r} (expected config.json + weights)")
        self.vae = AutoencoderKL.from_pretrained(autoencoder).requires_grad_(False).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = UNet2DConditionModel(**(unet or default_prior_unet()))
            self.text_encoder = tiny_text_encoder(text_encoder or default_text_encoder()).requires_grad_(False)
        if self.unet.config.in_channels != 4:
            raise ValueError(f"the image prior takes 4 latent channels, got in_channels={self.unet.config.in_channels}")
        self.tokenizer = byte_level_tokenizer()
        self.noise_scheduler = sd2_noise_scheduler()
        embedding = empty_prompt_embedding(self.text_encoder.eval(), self.tokenizer, "max_length")
        self.register_buffer("empty_text_embedding", embedding, persistent=False)
        self.latent_scale = float(self.vae.config.scaling_factor)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def encode(self, rgb: Tensor) -> Tensor:
        return self.vae.encode(rgb).latent_dist.mode() * self.latent_scale

    def denoise(self, z_t: Tensor, t: Tensor) -> Tensor:
        context = self.empty_text_embedding.expand(z_t.shape[0], -1, -1)
        return self.unet(z_t, t, encoder_hidden_states=context).sample

    def v_loss(self, z_0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        z_t = self.noise_scheduler.add_noise(z_0, noise, t)
        target = self.noise_scheduler.get_velocity(z_0, noise, t)
        return masked_mse(self.denoise(z_t, t), target, torch.ones_like(target))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        z_0 = self.encode(batch["rgb"])
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (z_0.shape[0],), device=z_0.device)
        loss = self.v_loss(z_0, t, torch.randn_like(z_0))
        self.log("train/loss", loss, prog_bar=True, batch_size=z_0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        batch = drop_padding(batch)
        if batch is None:
            return
        z_0 = self.encode(batch["rgb"])
        generator = torch.Generator(device="cpu").manual_seed(batch_idx)
        noise = torch.randn(z_0.shape, generator=generator).to(z_0)
        for t in (99, 499, 899):  # fixed noise and timesteps: comparable across validations
            steps = torch.full((z_0.shape[0],), t, device=z_0.device, dtype=torch.long)
            self.log(f"val/v_loss_t{t}", self.v_loss(z_0, steps, noise), batch_size=z_0.shape[0])
        if batch_idx == 0:
            self._log_samples(tuple(z_0.shape[1:]))

    @torch.no_grad()
    def sample(self, count: int, latent_shape: tuple[int, int, int], seed: int = 0) -> Tensor:
        """Images in [0, 1] sampled from pure noise with DDIM (trailing spacing)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn((count, *latent_shape), generator=generator).to(self.device)
        scheduler = inference_scheduler(self.noise_scheduler, "trailing")
        z_0 = sample_latent(self.denoise, scheduler, z, self.hparams.sample_steps)
        return ((self.vae.decode(z_0 / self.latent_scale).sample + 1) / 2).clamp(0, 1)

    def _log_samples(self, latent_shape: tuple[int, int, int]) -> None:
        logger = self.logger
        if logger is None or not self.trainer.is_global_zero or not hasattr(logger.experiment, "add_image"):
            return
        images = self.sample(8, latent_shape).cpu()
        grid = stack_rows([torch.cat(list(images[:4]), dim=2), torch.cat(list(images[4:]), dim=2)])
        logger.experiment.add_image("val/samples", grid, self.global_step)
