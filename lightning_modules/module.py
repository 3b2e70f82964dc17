"""The LightningModule: owns the model core, the task, the objective and the stages (fit, validate, test, predict).

The maths lives elsewhere: `core.GeometryCore` (VAE, UNet, scheduler), `tasks` (what is predicted), `objectives`
(training losses), `predictor` (inference). Previews, metric tables and prediction files are callbacks
(`lightning_modules.callbacks`), added by `configure_callbacks` unless the trainer already has one of the kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
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
from lightning_modules.skips import SkipCounts
from lightning_modules.speed import SpeedSpec, adamw_options, apply_to_core
from lightning_modules.tasks import TASKS, build_task
from lightning_modules.tiny import TinySpec, build_tiny_components

FROZEN_PREFIXES = ("core.vae.",)
# Checkpoints written before the core existed kept these at the top level.
_LEGACY_PREFIXES = ("unet.", "vae.", "empty_text_embedding")
EMPTY_BATCH_WARN_EVERY = 10  # warn at the 1st, 11th, 21st, ... micro-batch without a valid pixel


class NoValidPixelsError(RuntimeError):
    """Training stopped: `max_empty_batches` consecutive micro-batches had no valid pixel (nothing to learn from).

    A data or configuration problem, not a bug: the command line prints it without a traceback.
    """


class NoValidPixelsWarning(UserWarning):
    """A training micro-batch, or a whole validation/test pass, had no valid pixel."""


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
        max_empty_batches: stop training with `NoValidPixelsError` after this many consecutive micro-batches without
            a valid pixel (by the task's `valid_mask`, over all devices); 0 = never stop. Each such micro-batch is
            counted (`train/empty_batches`) and warned about (every `EMPTY_BATCH_WARN_EVERY`-th).
        speed: speed switches (`lightning_modules.speed.SpeedSpec`: channels_last, contiguous_group_norm,
            compile_unet, optimizer_impl).
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
        max_empty_batches: int = 50,
        speed: SpeedSpec | None = None,
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
        if max_empty_batches < 0:
            raise ValueError(f"max_empty_batches must be >= 0 (0 = never stop), got {max_empty_batches}")
        self.max_empty_batches = max_empty_batches
        self.empty_batches = 0  # micro-batches without a valid pixel, all of training (kept in checkpoints)
        self.consecutive_empty = 0  # ... in a row, up to the current one
        self.empty_since_step = 0  # optimiser step of the first of those
        self.speed = _as_dataclass(SpeedSpec, speed)
        self.configure_models(pretrained, tiny, conv_in_rule, prompt_padding, gradient_checkpointing)
        # A diffusers folder's pipeline settings decide how its predictions decode (normals: use_full_z_range).
        folder_options = TASKS[task].folder_options(_model_index(pretrained))
        if folder_options:
            self.task = build_task(task, **folder_options)
        apply_to_core(self.core, self.speed)
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
        self.val_images, self.test_images = SumMetric(), SumMetric()  # images scored (a valid pixel), padding excluded
        self.val_seen, self.test_seen = SumMetric(), SumMetric()  # images evaluated, scored or not, padding excluded
        # samples the data streams skipped (corrupt shards, bad images or metadata), per reason
        self.train_skips, self.val_skips, self.test_skips = SkipCounts(), SkipCounts(), SkipCounts()
        self.test_results: tuple[dict[str, float], int] | None = None  # read by MetricTableWriter

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        parameters = list(self.core.unet.parameters())
        optimizer = torch.optim.AdamW(
            parameters, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay,
            **adamw_options(parameters, self.speed.optimizer_impl),
        )  # fmt: skip
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
        self._log_train_skips(batch)
        fraction = self._check_valid_pixels(batch)
        loss, extras = self.objective.training_loss(self.core, self.task, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, batch keys {batch.get('key')}"
            )
        batch_size = batch["rgb"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/valid_fraction", fraction, batch_size=batch_size)
        self.log("train/empty_batches", float(self.empty_batches), batch_size=batch_size)
        for name, value in extras.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss  # the learning rate is logged by LearningRateMonitor (configs/trainer/*.yaml)

    def _log_train_skips(self, batch: dict[str, Tensor]) -> None:
        """Running totals `data/skipped_<reason>` over all ranks, synced only at the trainer's logging interval."""
        if "skipped" in batch:
            self.train_skips.update(batch["skipped"])
        if self._trainer is None or self.train_skips.update_count == 0:
            return
        if self.global_step % max(self.trainer.log_every_n_steps, 1):
            return  # every rank reaches this line at the same steps, so the sync in compute() is collective
        for reason, value in self.train_skips.compute().items():  # local states stay: a running total
            self.log(f"data/skipped_{reason}", value.float(), batch_size=1)

    def _check_valid_pixels(self, batch: dict[str, Tensor]) -> float:
        """Fraction of valid pixels of the micro-batch over all devices; counts, warns about and, when it persists,
        stops on micro-batches without any. The counts are summed over ranks, so every rank decides alike (a
        rank raising alone would leave the others waiting in the gradient all-reduce)."""
        valid = self.task.valid_mask(batch)
        counts = torch.stack([valid.sum(), torch.tensor(valid.numel(), device=valid.device)]).double()
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        n_valid, n_total = counts.tolist()
        if n_valid > 0:
            self.consecutive_empty = 0
            return n_valid / max(n_total, 1.0)
        if self.consecutive_empty == 0:
            self.empty_since_step = self.global_step
        self.consecutive_empty += 1
        self.empty_batches += 1
        if self.max_empty_batches and self.consecutive_empty >= self.max_empty_batches:
            raise NoValidPixelsError(
                f"training stopped: {self.consecutive_empty} consecutive micro-batches (optimiser steps "
                f"{self.empty_since_step} to {self.global_step}) had no valid pixel, so the loss was 0 and nothing was "
                f"learned. {self._empty_causes()} Last batch keys: {_keys(batch)}. The limit is "
                f"--model.init_args.max_empty_batches={self.max_empty_batches} (0 = never stop)."
            )
        if (self.empty_batches - 1) % EMPTY_BATCH_WARN_EVERY == 0:
            limit = f"stops after {self.max_empty_batches} in a row" if self.max_empty_batches else "never stops"
            rank_zero_warn(
                f"micro-batch without a valid pixel at optimiser step {self.global_step} (batch keys {_keys(batch)}): "
                f"its loss is 0. {self.empty_batches} such micro-batch(es) so far, {self.consecutive_empty} in a row "
                f"(training {limit}, --model.init_args.max_empty_batches; this warning repeats every "
                f"{EMPTY_BATCH_WARN_EVERY}). {self._empty_causes()}",
                category=NoValidPixelsWarning,
            )
        return 0.0

    def _empty_causes(self) -> str:
        """The data settings to check when nothing is valid, with the datamodule's values where it has them."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        low, high = getattr(datamodule, "min_depth", None), getattr(datamodule, "max_depth", None)
        depth_range = f" (now {low} to {high} m)" if low is not None and high is not None else ""
        return (
            f"Likely causes: empty or all-false masks in the shards; a ground-truth depth range that excludes every "
            f"pixel, --data.init_args.min_depth / --data.init_args.max_depth{depth_range}, also tightened by each "
            f"sample's min_depth/max_depth metadata; constant depth (no affine-invariant signal: build_targets masks "
            f"such images out); for normals, samples without ground-truth normals."
        )

    def _evaluate(self, batch: dict[str, Any], metrics: Metric, images: Metric, seen: Metric) -> dict[str, Any] | None:
        """Metrics for the real samples of a batch (padding dropped); returns them with their prediction.

        `images` counts the images the metrics scored (`scored_images` of the metric; for a metric without it,
        the images with a valid pixel by the task's mask), `seen` every real image."""
        if "skipped" in batch:  # before dropping padding: pad samples may carry counts
            (self.val_skips if metrics is self.val_metrics else self.test_skips).update(batch["skipped"])
        batch = drop_padding(batch)
        if batch is None:
            return None
        prediction = self.evaluation_prediction(batch["rgb"])[self.task.name]
        scored_batch = {**batch, "mask": crop_mask(batch["mask"], self.evaluation.crop)}
        before = getattr(metrics, "scored_images", None)
        before = before.clone() if isinstance(before, Tensor) else None
        self.task.update_metrics(metrics, prediction, scored_batch)
        if before is not None:
            scored = metrics.scored_images - before
        else:
            scored = self.task.valid_mask(scored_batch).flatten(1).any(1).sum()
        images.update(scored.to(prediction.device, torch.float32))
        seen.update(torch.tensor(float(len(batch["key"])), device=prediction.device))
        return {"batch": batch, "prediction": prediction}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, self.val_metrics, self.val_images, self.val_seen)  # PredictionPreviews draws some

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, self.val_images, self.val_seen, "val")
        self._log_eval_skips(self.val_skips, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_images, self.test_seen)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics(self.test_metrics, self.test_images, self.test_seen, "test")
        self._log_eval_skips(self.test_skips, "test")

    def _log_eval_skips(self, skips: SkipCounts, stage: str) -> None:
        """`data/<stage>_skipped_<reason>`: samples of this pass the streams could not use, over all ranks."""
        if skips.update_count == 0:
            return
        for reason, value in skips.compute().items():
            self.log(f"data/{stage}_skipped_{reason}", value.float(), sync_dist=False)
        skips.reset()

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

    def _log_metrics(self, metrics: Metric, images: Metric, seen: Metric, stage: str) -> tuple[dict[str, float], int]:
        """Log the synced metrics and the count of scored images; return them and reset the states.

        When no image was scored, only `<stage>/images` (0) is logged, with a warning, instead of NaN metrics."""
        values = {k: float(v) for k, v in metrics.compute().items()}
        count, total = int(images.compute().item()), int(seen.compute().item())
        if count > 0:
            self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        else:
            spec = self.evaluation
            rank_zero_warn(
                f"{stage} at optimiser step {self.global_step}: no image of {spec.dataset!r} was scored: none of its "
                f"{total} image(s) had a valid pixel, so no {stage} metric is logged (only {stage}/images = 0). "
                f"{self._empty_causes()} Evaluation: model.init_args.evaluation min_depth {spec.min_depth}, "
                f"max_depth {spec.max_depth} (ground-truth range test {'on' if spec.mask_gt_range else 'off'}), "
                f"crop {spec.crop}.",
                category=NoValidPixelsWarning,
            )
        self.log(f"{stage}/images", float(count), sync_dist=False)
        for state in (metrics, images, seen):
            state.reset()
        return values, count

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights and training state; the frozen VAE is rebuilt from its source."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint["empty_batches"] = self.empty_batches  # train/empty_batches continues after a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.empty_batches = int(checkpoint.get("empty_batches", 0))
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_LEGACY_PREFIXES)]:
            state[f"core.{key}"] = state.pop(key)
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES):
                state.setdefault(key, value)


def _keys(batch: dict[str, Any], limit: int = 8) -> str:
    """The first sample keys of a batch, for messages."""
    keys = list(batch.get("key") or [])
    return ", ".join(map(str, keys[:limit])) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "") or "none"


def _model_index(pretrained: str | None) -> dict[str, Any]:
    """model_index.json of a local diffusers folder ({} for hub ids, tiny models and folders without one)."""
    index = Path(pretrained) / "model_index.json" if pretrained else None
    return json.loads(index.read_text()) if index is not None and index.is_file() else {}


def _as_dataclass(cls: type, value: Any) -> Any:
    """A dataclass argument from itself, a mapping (checkpoint hyperparameters) or None (its defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value
