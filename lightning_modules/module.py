"""The LightningModule: frozen VAE + empty-prompt embedding + trainable 8-channel UNet, switchable objective."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_modules.components import (
    Components,
    ConvInRule,
    PromptPadding,
    empty_prompt_embedding,
    ensure_eight_channel_unet,
    load_pretrained_components,
)
from lightning_modules.evaluation import EvalSpec, crop_mask, prepare_input, write_tables
from lightning_modules.inference import InferenceSpec, inference_scheduler, initial_latent, sample_latent
from lightning_modules.lr_schedule import warmup_exponential_lambda
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from lightning_modules.objectives import E2EObjective, Objective
from lightning_modules.padding import drop_padding
from lightning_modules.predictor import predict
from lightning_modules.tasks import TaskName, build_task
from lightning_modules.tiny import TinySpec, build_tiny_components
from lightning_modules.visualize import stack_rows

FROZEN_PREFIXES = ("vae.",)


class GeometryEstimator(L.LightningModule):
    """Marigold-style image-conditional diffusion model for depth or normals with a switchable objective.

    Args:
        objective: `DiffusionObjective` (Marigold training) or `E2EObjective` (fixed-timestep task loss).
        pretrained: diffusers-format folder or hub id (Marigold: 8-channel UNet; Stable Diffusion 2: 4-channel
            UNet, widened by `conv_in_rule`). Exactly one of `pretrained` and `tiny` must be given.
        tiny: architecture of a tiny randomly initialised model built from config (demo and tests).
        conv_in_rule: bias rule when widening a 4-channel conv_in (`marigold` keeps it, `e2e_ft` halves it).
        prompt_padding: `none` = 2-token empty prompt (default), `max_length` = 77-token (E2E-FT trainer ablation).
        task: what is predicted: `depth` (affine-invariant) or `normals` (camera frame, x left, y up, z out).
        lr, betas, eps, weight_decay: AdamW on the UNet parameters.
        warmup_steps, decay_steps, final_lr_ratio: linear warm-up then exponential decay to `final_lr_ratio`.
        gradient_checkpointing: recompute UNet (and VAE decoder) activations in the backward pass.
        inference: how validation/test/predict make predictions (steps, spacing, initial latent, seed).
        eval_min_depth, eval_max_depth: metric depth range used to clip aligned predictions (depth metrics).
        preview_batches: number of validation batches drawn into the TensorBoard preview grid.
        evaluation: the dataset's evaluation protocol for validation and test (resolution, clip range, alignment
            resolution, crop, table name); not saved with the checkpoint's hyperparameters, so an evaluation config
            still applies when `--ckpt_path` restores the rest of the model from the checkpoint.
    """

    def __init__(
        self,
        objective: Objective | None = None,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        conv_in_rule: ConvInRule = "e2e_ft",
        prompt_padding: PromptPadding = "none",
        task: TaskName = "depth",
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        decay_steps: int = 20_000,
        final_lr_ratio: float = 0.01,
        gradient_checkpointing: bool = False,
        inference: InferenceSpec | None = None,
        eval_min_depth: float = 1e-3,
        eval_max_depth: float = 80.0,
        preview_batches: int = 2,
        evaluation: EvalSpec | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "evaluation"])
        self.objective = objective if objective is not None else E2EObjective()
        self.task = build_task(task)
        self.inference = inference if inference is not None else InferenceSpec()
        self.evaluation = evaluation if evaluation is not None else EvalSpec()
        if self.evaluation.task not in (None, self.task.name):
            raise ValueError(
                f"evaluation protocol {self.evaluation.dataset!r} is for {self.evaluation.task} models, "
                f"this model predicts {self.task.name}"
            )
        self.preview_batches = preview_batches
        self.configure_models(pretrained, tiny, conv_in_rule, prompt_padding, gradient_checkpointing)
        self.configure_metrics(eval_min_depth, eval_max_depth)

    # ----------------------------------------------------------------------------------------------- set-up
    def configure_models(
        self,
        pretrained: str | None,
        tiny: TinySpec | None,
        conv_in_rule: ConvInRule,
        prompt_padding: PromptPadding,
        gradient_checkpointing: bool,
    ) -> None:
        """Build or load the components, widen conv_in if needed, cache the empty-prompt embedding."""
        if (pretrained is None) == (tiny is None):
            raise ValueError("give exactly one of `pretrained` (folder or hub id) and `tiny` (architecture)")
        parts: Components = (
            load_pretrained_components(pretrained) if pretrained is not None else build_tiny_components(tiny)
        )
        ensure_eight_channel_unet(parts.unet, conv_in_rule)
        self.unet = parts.unet
        self.vae = parts.vae.requires_grad_(False).eval()
        self.noise_scheduler = parts.scheduler
        # The text encoder is used once; only its output is kept (and saved with checkpoints).
        self.register_buffer(
            "empty_text_embedding", empty_prompt_embedding(parts.text_encoder, parts.tokenizer, prompt_padding)
        )
        if self.unet.config.cross_attention_dim != self.empty_text_embedding.shape[-1]:
            raise ValueError("text encoder hidden size does not match the UNet's cross_attention_dim")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_scale = float(self.vae.config.scaling_factor)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def configure_metrics(self, min_depth: float, max_depth: float) -> None:
        """One metric collection per stage, cloned so states never mix; the evaluation spec's range wins."""
        spec = self.evaluation
        low = spec.min_depth if spec.min_depth is not None else min_depth
        high = spec.max_depth if spec.max_depth is not None else max_depth
        self.val_metrics = self.task.make_metrics(low, high, spec.align_max_res, spec.mask_gt_range)
        self.test_metrics = self.val_metrics.clone()
        self.val_images, self.test_images = SumMetric(), SumMetric()  # images evaluated, padding excluded

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_exponential_lambda(hp.warmup_steps, hp.decay_steps, hp.final_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------------ model primitives
    @torch.no_grad()
    def encode(self, image: Tensor) -> Tensor:
        """Posterior mean of the frozen VAE encoder, scaled (no sampling, no gradient)."""
        return self.vae.encode(image).latent_dist.mode() * self.latent_scale

    def decode(self, latent: Tensor) -> Tensor:
        """Frozen VAE decoder, kept in the autograd graph so task losses reach the UNet."""
        return self.vae.decode(latent / self.latent_scale).sample

    def unet_forward(self, z_rgb: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """UNet on [image latent, noisy target latent] with the cached empty-prompt embedding."""
        context = self.empty_text_embedding.expand(z_rgb.shape[0], -1, -1)
        return self.unet(torch.cat([z_rgb, z_t], dim=1), t, encoder_hidden_states=context).sample

    def predicted_original(self, output: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """x0 from the model output at timestep t, by the scheduler's prediction type and alphas_cumprod."""
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(device=output.device, dtype=torch.float32)[t]
        alpha_bar = alpha_bar.view(-1, 1, 1, 1)
        kind = self.noise_scheduler.config.prediction_type
        out, z = output.float(), z_t.float()
        if kind == "v_prediction":
            z_0 = alpha_bar.sqrt() * z - (1 - alpha_bar).sqrt() * out
        elif kind == "epsilon":
            z_0 = (z - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()
        elif kind == "sample":
            z_0 = out
        else:
            raise ValueError(f"unsupported prediction type {kind!r}")
        return z_0.to(output.dtype)

    @torch.no_grad()
    def predict_image(self, rgb: Tensor, spec: InferenceSpec | None = None) -> Tensor:
        """Task prediction for images in [-1, 1] with sizes divisible by the VAE factor (depth: [B,1,H,W])."""
        return self.predict_from_latent(self.encode(rgb), spec)

    @torch.no_grad()
    def predict_from_latent(self, z_rgb: Tensor, spec: InferenceSpec | None = None) -> Tensor:
        """`predict_image` for an already encoded image latent (ensemble members share one encoding)."""
        spec = spec or self.inference
        scheduler = inference_scheduler(self.noise_scheduler, spec.spacing)
        z_init = initial_latent(z_rgb.shape, spec.init_latent, spec.seed, z_rgb.device, z_rgb.dtype)
        z_0 = sample_latent(lambda z, t: self.unet_forward(z_rgb, z, t), scheduler, z_init, spec.num_steps)
        return self.task.from_decoded(self.decode(z_0.to(z_rgb.dtype)))

    # ------------------------------------------------------------------------------------------- stages
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, extras = self.objective.training_loss(self, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, batch keys {batch.get('key')}"
            )
        batch_size = batch["rgb"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in extras.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def evaluation_prediction(self, rgb: Tensor) -> Tensor:
        """Prediction for batch images in [-1, 1] through the one inference path (`predictor.predict`) at the
        evaluation spec's processing resolution, in output conventions (depth in [0, 1], unit normals)."""
        spec = self.evaluation
        images = prepare_input((rgb.float() + 1) / 2, spec.input_mode)
        device = rgb.device.type
        # Keep bf16 autocast when the trainer runs it (fast validation); otherwise predict in float32.
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        output = predict(
            self, images, spec.processing_resolution, spec.ensemble_size, self.inference, len(images), bf16=bf16
        )
        return output[self.task.name].to(rgb.device)

    def _evaluate(self, batch: dict[str, Any], metrics: Metric, images: Metric) -> tuple[dict[str, Any], Tensor] | None:
        """Metrics for the real samples of a batch (padding dropped); returns them and their prediction."""
        batch = drop_padding(batch)
        if batch is None:
            return None
        prediction = self.evaluation_prediction(batch["rgb"])
        self.task.update_metrics(metrics, prediction, {**batch, "mask": crop_mask(batch["mask"], self.evaluation.crop)})
        images.update(torch.tensor(float(len(batch["key"])), device=prediction.device))
        return batch, prediction

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        evaluated = self._evaluate(batch, self.val_metrics, self.val_images)
        if evaluated is not None and batch_idx < self.preview_batches:
            self._log_preview(*evaluated, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, self.val_images, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_images)

    def on_test_epoch_end(self) -> None:
        values, images = self._log_metrics(self.test_metrics, self.test_images, "test")
        folder = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and folder is not None:
            write_tables(folder, self.evaluation.dataset, images, values)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return {"key": batch.get("key"), self.task.name: self.evaluation_prediction(batch["rgb"]).cpu()}

    def _log_metrics(self, metrics: Metric, images: Metric, stage: str) -> tuple[dict[str, float], int]:
        """Log the synced metrics and image count; return them and reset the states."""
        values = {k: float(v) for k, v in metrics.compute().items()}
        count = int(images.compute().item())
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        self.log(f"{stage}/images", float(count), sync_dist=False)
        metrics.reset()
        images.reset()
        return values, count

    def _log_preview(self, batch: dict[str, Tensor], prediction: Tensor, batch_idx: int) -> None:
        logger = self.logger
        if logger is None or not self.trainer.is_global_zero or not hasattr(logger.experiment, "add_image"):
            return
        rows = [self.task.preview_row(prediction, batch, i) for i in range(prediction.shape[0])]  # padding dropped
        logger.experiment.add_image(f"val/preview_{batch_idx}", stack_rows(rows), self.global_step)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights and training state; the frozen VAE is rebuilt from its source."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES):
                state.setdefault(key, value)
