"""The LightningModule: owns the model core, the task, the objective and the stages (fit, validate, test, predict).

The maths lives elsewhere: `core.GeometryCore` (VAE, UNet, scheduler), `tasks` (what is predicted), `objectives`
(training losses), `predictor` (inference). Previews, metric tables and prediction files are callbacks
(`lightning_modules.callbacks`), added by `configure_callbacks` unless the trainer already has one of the kind.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from lightning_modules.callbacks import MetricTableWriter, PredictionPreviews, PredictionWriter
from lightning_modules.components import ConvInRule, PromptPadding, load_pretrained_components
from lightning_modules.core import GeometryCore
from lightning_modules.evaluation import EvalSpec, crop_mask, prepare_input
from lightning_modules.inference import InferenceSpec
from lightning_modules.lr_schedule import warmup_exponential_lambda
from lightning_modules.objectives import Objective, build_objective, objective_config
from lightning_modules.padding import drop_padding
from lightning_modules.predictor import predict, predict_latent
from lightning_modules.tasks import build_task
from lightning_modules.tiny import TinySpec, build_tiny_components

FROZEN_PREFIXES = ("core.vae.",)
# Checkpoints written before the core existed kept these at the top level.
_LEGACY_PREFIXES = ("unet.", "vae.", "empty_text_embedding")


class GeometryEstimator(L.LightningModule):
    """Marigold-style image-conditional diffusion model for a task (depth, normals, ...) with a switchable objective.

    Args:
        objective: `DiffusionObjective` (Marigold training) or `E2EObjective` (fixed-timestep task loss); saved with
            the checkpoint's hyperparameters, so `load_from_checkpoint` rebuilds the same objective.
        pretrained: diffusers-format folder or hub id (Marigold: 8-channel UNet; Stable Diffusion 2: 4-channel
            UNet, widened by `conv_in_rule`). Exactly one of `pretrained` and `tiny` must be given.
        tiny: architecture of a tiny randomly initialised model built from config (demo and tests).
        conv_in_rule: bias rule when widening a 4-channel conv_in (`marigold` keeps it, `e2e_ft` halves it).
        prompt_padding: `none` = 2-token empty prompt (default), `max_length` = 77-token (E2E-FT trainer ablation).
        task: what is predicted, a registered task name (`depth`: affine-invariant; `normals`: camera frame, x left,
            y up, z out; see docs/extending.md to add one).
        lr, betas, eps, weight_decay: AdamW on the UNet parameters.
        warmup_steps, decay_steps, final_lr_ratio: linear warm-up then exponential decay to `final_lr_ratio`.
        gradient_checkpointing: recompute UNet (and VAE decoder) activations in the backward pass.
        inference: how validation/test/predict make predictions (steps, spacing, initial latent, seed).
        preview_batches: number of validation batches drawn into the TensorBoard preview grid.
        evaluation: the dataset's evaluation protocol for validation, test and predict (resolution, depth range,
            alignment, crop, table name); not saved with the checkpoint's hyperparameters, so an evaluation config
            still applies when `--ckpt_path` restores the rest of the model from the checkpoint.
    """

    def __init__(
        self,
        objective: Objective | None = None,
        pretrained: str | None = None,
        tiny: TinySpec | None = None,
        conv_in_rule: ConvInRule = "e2e_ft",
        prompt_padding: PromptPadding = "none",
        task: str = "depth",
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        decay_steps: int = 20_000,
        final_lr_ratio: float = 0.01,
        gradient_checkpointing: bool = False,
        inference: InferenceSpec | None = None,
        preview_batches: int = 2,
        evaluation: EvalSpec | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "evaluation"])
        self.objective = build_objective(objective)
        self.hparams["objective"] = objective_config(self.objective)
        self.task = build_task(task)
        self.inference = _as_dataclass(InferenceSpec, inference)
        self.evaluation = _as_dataclass(EvalSpec, evaluation)
        if self.evaluation.task not in (None, self.task.name):
            raise ValueError(
                f"evaluation protocol {self.evaluation.dataset!r} is for {self.evaluation.task} models, "
                f"this model predicts {self.task.name}"
            )
        self.preview_batches = preview_batches
        self.configure_models(pretrained, tiny, conv_in_rule, prompt_padding, gradient_checkpointing)
        self.configure_metrics()

    # ----------------------------------------------------------------------------------------------- set-up
    def configure_models(
        self,
        pretrained: str | None,
        tiny: TinySpec | dict[str, Any] | None,
        conv_in_rule: ConvInRule,
        prompt_padding: PromptPadding,
        gradient_checkpointing: bool,
    ) -> None:
        """Load or build the components and wrap them in the model core."""
        if (pretrained is None) == (tiny is None):
            raise ValueError("give exactly one of `pretrained` (folder or hub id) and `tiny` (architecture)")
        if pretrained is not None:
            parts = load_pretrained_components(pretrained)
        else:
            parts = build_tiny_components(_as_dataclass(TinySpec, tiny))
        self.core = GeometryCore(parts, conv_in_rule, prompt_padding, gradient_checkpointing)

    def configure_metrics(self) -> None:
        """One metric collection per stage, cloned so states never mix."""
        self.val_metrics = self.task.make_metrics(self.evaluation)
        self.test_metrics = self.val_metrics.clone()
        self.val_images, self.test_images = SumMetric(), SumMetric()  # images evaluated, padding excluded
        self.test_results: tuple[dict[str, float], int] | None = None  # read by MetricTableWriter

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.core.unet.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_exponential_lambda(hp.warmup_steps, hp.decay_steps, hp.final_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> list[Callback]:
        """Previews, metric tables and prediction files, unless the trainer's config already brings its own."""
        present = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        defaults = [PredictionPreviews(self.preview_batches), MetricTableWriter(), PredictionWriter()]
        return [c for c in defaults if not any(issubclass(p, type(c)) for p in present)]

    # ------------------------------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_image(self, rgb: Tensor, spec: InferenceSpec | None = None) -> Tensor:
        """Task prediction in model conventions for images in [-1, 1] with sizes divisible by the VAE factor."""
        return predict_latent(self.core, self.task, self.core.encode(rgb), spec or self.inference)

    def evaluation_prediction(self, rgb: Tensor) -> dict[str, Any]:
        """Predictions for batch images in [-1, 1] through the one inference path (`predictor.predict`) under the
        evaluation protocol, in output conventions (depth in [0, 1], unit normals), on the batch's device."""
        spec = self.evaluation
        images = prepare_input((rgb.float() + 1) / 2, spec.input_mode)
        device = rgb.device.type
        # Keep bf16 autocast when the trainer runs it (fast validation); otherwise predict in float32.
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        return predict(
            self.core, self.task, images, spec.processing_resolution, spec.ensemble_size, self.inference,
            len(images), ensemble_options=self.task.ensemble_options(spec), bf16=bf16,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------- stages
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, extras = self.objective.training_loss(self.core, self.task, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, batch keys {batch.get('key')}"
            )
        batch_size = batch["rgb"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in extras.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss  # the learning rate is logged by LearningRateMonitor (configs/trainer/*.yaml)

    def _evaluate(self, batch: dict[str, Any], metrics: Metric, images: Metric) -> dict[str, Any] | None:
        """Metrics for the real samples of a batch (padding dropped); returns them with their prediction."""
        batch = drop_padding(batch)
        if batch is None:
            return None
        prediction = self.evaluation_prediction(batch["rgb"])[self.task.name]
        self.task.update_metrics(metrics, prediction, {**batch, "mask": crop_mask(batch["mask"], self.evaluation.crop)})
        images.update(torch.tensor(float(len(batch["key"])), device=prediction.device))
        return {"batch": batch, "prediction": prediction}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, self.val_metrics, self.val_images)  # PredictionPreviews draws some of these

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, self.val_images, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_images)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics(self.test_metrics, self.test_images, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        """Output-convention predictions of the real samples (padding dropped), on the CPU; PredictionWriter
        writes them as `infer` does."""
        batch = drop_padding(batch)
        if batch is None:
            return None
        result = self.evaluation_prediction(batch["rgb"])
        uncertainty = result["uncertainty"]
        return {
            "key": list(batch["key"]),
            self.task.name: result[self.task.name].cpu(),
            "uncertainty": uncertainty.cpu() if uncertainty is not None else None,
        }

    def _log_metrics(self, metrics: Metric, images: Metric, stage: str) -> tuple[dict[str, float], int]:
        """Log the synced metrics and image count; return them and reset the states."""
        values = {k: float(v) for k, v in metrics.compute().items()}
        count = int(images.compute().item())
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        self.log(f"{stage}/images", float(count), sync_dist=False)
        metrics.reset()
        images.reset()
        return values, count

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights and training state; the frozen VAE is rebuilt from its source."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_LEGACY_PREFIXES)]:
            state[f"core.{key}"] = state.pop(key)
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES):
                state.setdefault(key, value)


def _as_dataclass(cls: type, value: Any) -> Any:
    """A dataclass argument from itself, a mapping (checkpoint hyperparameters) or None (its defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value
