"""Export a trained GeometryEstimator as a folder that stock `diffusers.MarigoldDepthPipeline` loads (RECIPE §7)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, MarigoldDepthPipeline, SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_modules.components import empty_prompt_embedding
from lightning_modules.tiny import TinySpec, build_tiny_components

if TYPE_CHECKING:
    from lightning_modules.module import GeometryEstimator


def export_scheduler(noise_scheduler: SchedulerMixin, set_alpha_to_one: bool = True) -> DDIMScheduler:
    """The DDIM inference scheduler of RECIPE §7.2, sharing the training betas and prediction type.

    `set_alpha_to_one=True` (our default; published Marigold folders use False) makes the pipeline's final
    `prev_sample` equal the predicted x0, which is what `GeometryEstimator.predict_image` returns (RECIPE §5.2).
    """
    config = noise_scheduler.config
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        trained_betas=config.get("trained_betas"),
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def _as_tiny_spec(spec: Any) -> TinySpec:
    return TinySpec(**spec) if isinstance(spec, dict) else spec


def text_components(
    model: GeometryEstimator, tokenizer_source: str | None = None
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Recover the text encoder and tokenizer the module dropped: from `tokenizer_source` if given (a diffusers
    folder or hub id with `text_encoder/` and `tokenizer/`), else rebuilt from `hparams.tiny` or loaded from
    `hparams.pretrained`. Raises unless they re-embed the empty prompt to `model.empty_text_embedding`."""
    hparams = model.hparams
    source = tokenizer_source or hparams.get("pretrained")
    if source is not None:
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    elif hparams.get("tiny") is not None:
        parts = build_tiny_components(_as_tiny_spec(hparams.tiny))
        text_encoder, tokenizer = parts.text_encoder, parts.tokenizer
    else:
        raise ValueError("model has neither `pretrained` nor `tiny`: pass tokenizer_source to recover the text encoder")
    # The pipeline always embeds "" unpadded ([BOS, EOS]); a 77-token model would be conditioned differently.
    reference = model.empty_text_embedding.detach().float().cpu()
    embedding = empty_prompt_embedding(text_encoder.float().cpu().eval(), tokenizer, "none")
    if embedding.shape != reference.shape or not torch.allclose(embedding, reference, rtol=1e-4, atol=1e-5):
        detail = f"shapes {tuple(embedding.shape)} vs {tuple(reference.shape)}"
        if embedding.shape == reference.shape:
            detail = f"max difference {(embedding - reference).abs().max().item():.3g}"
        raise ValueError(
            f"the text encoder from {source or 'hparams.tiny'!r} does not reproduce the model's cached empty-prompt "
            f"embedding ({detail}); the stock pipeline embeds the unpadded 2-token prompt, so the model must use "
            "prompt_padding='none' and the text encoder it was built from (pass tokenizer_source)."
        )
    return text_encoder, tokenizer


def export_to_diffusers(
    model: GeometryEstimator,
    out_dir: str | Path,
    processing_resolution: int = 768,
    denoising_steps: int = 1,
    tokenizer_source: str | None = None,
    set_alpha_to_one: bool = True,
) -> Path:
    """Write `model` as a MarigoldDepthPipeline folder (depth, affine-invariant) and return its path."""
    if model.task.name != "depth":
        raise ValueError(f"only depth models can be exported to MarigoldDepthPipeline, not {model.task.name!r}")
    if processing_resolution % model.vae_scale_factor:
        raise ValueError(f"processing_resolution must be a multiple of {model.vae_scale_factor} (0 = native)")
    text_encoder, tokenizer = text_components(model, tokenizer_source)
    pipeline = MarigoldDepthPipeline(
        unet=model.unet,
        vae=model.vae,
        scheduler=export_scheduler(model.noise_scheduler, set_alpha_to_one),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prediction_type="depth",
        scale_invariant=True,
        shift_invariant=True,
        default_denoising_steps=denoising_steps,
        default_processing_resolution=processing_resolution,
    )
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

