"""Stand-in for Stable Diffusion's VAE: pretrain a diffusers `AutoencoderKL` to reconstruct images (docs/standin.md).

Each micro-batch reconstructs one kind of image, cycling through the kinds the estimator needs the decoder to
produce: RGB inputs, depth replicated to 3 channels in [-1, 1] (`depth_norm`, near = -1) and unit normals as
images. Loss: L1 reconstruction of a posterior sample plus `kl_weight` x KL(posterior || N(0, I)) per element.
After training, `scaling_factor` is set to 1 / std of the RGB latents (posterior means), as SD did.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from lightning_modules.padding import drop_padding
from lightning_modules.tiny import default_vae
from lightning_modules.visualize import normals_to_rgb, stack_rows

ImageKind = Literal["rgb", "depth", "normals"]
KINDS: tuple[ImageKind, ...] = ("rgb", "depth", "normals")


def default_autoencoder() -> dict[str, Any]:
    """8x downsampling, 4 latent channels (SD's layout at a CPU-friendly width): the tiny model's VAE."""
    return default_vae()


def kind_image(batch: dict[str, Tensor], kind: ImageKind) -> Tensor:
    """The 3-channel image in [-1, 1] of one kind, from a batch of the batch contract."""
    if kind == "rgb":
        return batch["rgb"]
    if kind == "depth":
        return batch["depth_norm"].expand(-1, 3, -1, -1)
    if kind == "normals":
        return batch["normals"]
    raise ValueError(f"unknown image kind {kind!r}; use rgb, depth or normals")


def reconstruction_scores(image: Tensor, recon: Tensor, kind: ImageKind, mask: Tensor) -> dict[str, Tensor]:
    """Per-kind quality: RGB PSNR (dB, on [0, 1]); depth mean abs error in % of the [-1, 1] range; normals
    mean angular error (degrees) over pixels with a ground-truth normal."""
    recon = recon.float().clamp(-1, 1)
    image = image.float()
    if kind == "rgb":
        mse = ((recon - image) / 2).pow(2).mean().clamp_min(1e-12)
        return {"rgb_psnr": -10 * torch.log10(mse)}
    if kind == "depth":
        return {"depth_error_pct": (recon.mean(1) - image[:, 0]).abs().mean() / 2 * 100}
    valid = mask[:, 0] & (image.norm(dim=1) > 0.5)
    cosine = F.cosine_similarity(recon, image, dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.arccos(cosine))
    return {"normals_error_deg": angle[valid].mean() if valid.any() else angle.new_tensor(float("nan"))}


class AutoencoderPretraining(L.LightningModule):
    """Train an `AutoencoderKL` from scratch on the images the estimator encodes and decodes.

    Args:
        autoencoder: diffusers `AutoencoderKL` config keys (default: `default_autoencoder()`).
        kinds: image kinds cycled over micro-batches (`rgb` only trains an RGB-only autoencoder).
        kl_weight: weight of the per-element KL term.
        lr, warmup_steps: AdamW learning rate with a linear warm-up.
        crop_size: train on one random square crop of this side per micro-batch (a multiple of 8; the
            autoencoder is convolutional, so it still runs at any size); None = whole images.
        scale_batches: validation batches whose RGB latents set `scaling_factor` at the end of training.
        seed: initialisation seed.
    """

    def __init__(
        self,
        autoencoder: dict[str, Any] | None = None,
        kinds: list[ImageKind] | None = None,
        kl_weight: float = 1e-3,
        lr: float = 2e-3,
        warmup_steps: int = 50,
        crop_size: int | None = 64,
        scale_batches: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kinds: list[ImageKind] = list(KINDS if kinds is None else kinds)
        if crop_size is not None and (crop_size < 8 or crop_size % 8):
            raise ValueError(f"crop_size must be a positive multiple of 8 or null, got {crop_size}")
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown image kind(s) {unknown} (or none given); use {list(KINDS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vae = AutoencoderKL(**(autoencoder or default_autoencoder()))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        kind = self.kinds[self.global_step % len(self.kinds)]
        image = self.random_crop(kind_image(batch, kind))
        posterior = self.vae.encode(image).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        with torch.autocast(device_type=image.device.type, enabled=False):
            l1 = (recon.float() - image.float()).abs().mean()
            kl = posterior.kl().float().mean() / image[0].numel()
            loss = l1 + self.hparams.kl_weight * kl
        size = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"train/l1_{kind}", l1, batch_size=size)
        self.log("train/kl", kl, batch_size=size)
        return loss

    def random_crop(self, image: Tensor) -> Tensor:
        size = self.hparams.crop_size
        height, width = image.shape[-2:]
        if size is None or (size >= height and size >= width):
            return image
        top = int(torch.randint(0, max(1, (height - size) // 8 + 1), ())) * 8
        left = int(torch.randint(0, max(1, (width - size) // 8 + 1), ())) * 8
        return image[..., top : top + size, left : left + size]

    @torch.no_grad()
    def reconstruct(self, image: Tensor) -> Tensor:
        """Decode the posterior mean (how the estimator uses the autoencoder)."""
        return self.vae.decode(self.vae.encode(image).latent_dist.mode()).sample

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        batch = drop_padding(batch)
        if batch is None:
            return
        rows = []
        for kind in KINDS:
            image = kind_image(batch, kind)
            recon = self.reconstruct(image)
            for name, value in reconstruction_scores(image, recon, kind, batch["mask"]).items():
                self.log(f"val/{name}", value, batch_size=image.shape[0])
            if batch_idx == 0:
                show = normals_to_rgb if kind == "normals" else (lambda x: ((x.float() + 1) / 2).clamp(0, 1))
                rows.append(torch.cat([show(image[0]), show(recon[0].clamp(-1, 1))], dim=2).cpu())
        logger = self.logger
        if rows and logger is not None and self.trainer.is_global_zero and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("val/reconstruction", stack_rows(rows), self.global_step)

    def on_fit_end(self) -> None:
        """Set `scaling_factor` = 1 / std of the RGB latents of the first validation batches (SD's rule)."""
        self.vae.register_to_config(scaling_factor=self.measure_scaling_factor())

    @torch.no_grad()
    def measure_scaling_factor(self) -> float:
        loader = self.trainer.datamodule.val_dataloader() if self.trainer.datamodule is not None else None
        if loader is None:
            raise RuntimeError("measuring the latent scale needs the datamodule's validation data")
        latents = []
        for i, batch in enumerate(loader):
            if i >= self.hparams.scale_batches:
                break
            batch = drop_padding(batch)
            if batch is not None:
                latents.append(self.vae.encode(batch["rgb"].to(self.device)).latent_dist.mode().float())
        if not latents:
            raise RuntimeError("no validation images to measure the latent scale on")
        std = torch.cat(latents).std().item()
        if not math.isfinite(std) or std <= 0:
            raise FloatingPointError(f"latent std {std} is not usable as a scale")
        return 1.0 / std
