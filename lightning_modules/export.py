"""Export a trained GeometryEstimator as a folder that stock diffusers loads (docs/method.md §7).

The pipeline class follows the model's task: depth models become `MarigoldDepthPipeline` folders
(`prediction_type="depth"`, scale- and shift-invariant), normals models `MarigoldNormalsPipeline` folders
(`prediction_type="normals"`, `use_full_z_range` as the task has it: True for models trained here). Both reload offline with `<Class>.from_pretrained(folder)` or
`DiffusionPipeline.from_pretrained(folder)`, and with `GeometryEstimator(pretrained=folder, task=...)`.

Normals: frame and conventions, as checked against diffusers 0.42 (tests/test_export.py)
- Frame. `MarigoldNormalsPipeline` returns the decoded VAE image's channels as they are (clip, L2-normalise, no
  axis flip or permutation), exactly as `NormalsTask.from_decoded` does, so its `prediction` is in the frame the
  model was trained in: ours, x left, y up, z towards the viewer (docs/method.md §4.1, §9.14). Run like `predict_image`
  (`latents=zeros`, `processing_resolution=0`, 1 step) it returns the same final latent exactly and, channel for
  channel, the same normals to within 1e-5 / |decoded| per element wherever the decoder stays inside [-1, 1]
  (next point). Nothing is needed to convert between the two.
- Post-processing order differs. diffusers clips the decoded image to [-1, 1] and then divides by
  `max(norm, 1e-6)`; `NormalsTask.from_decoded` divides by `norm + 1e-5` and then clamps (docs/method.md §1.6). The two
  agree (to ~1e-5 / norm) wherever the decoder stays inside [-1, 1], and differ in direction where a channel
  overshoots: e.g. decoded (1.5, 0.2, 0.1) gives (0.989, 0.132, 0.066) here but (0.976, 0.195, 0.098) in diffusers.
- `MarigoldImageProcessor.visualize_normals(n)` with its default flags colours RGB = (n + 1) / 2 (truncated to
  uint8), the same colours as our previews (docs/method.md §5.6: [0, 0, 1] -> (127, 127, 255); a left-facing surface in
  our frame, n = (1, 0, 0), -> (255, 127, 127)). Its docstring, however, names the default frame "x right, y up, z
  towards the observer": read with that label, our colours are mirrored left-right (docs/method.md §9.20). To express
  our normals in that documented frame, negate channel 0 (`flip_x=True`); leave flip_y/flip_z off (our y is up and z
  faces the viewer, as documented there). The flags only change colours, never `prediction`. Caveat: in diffusers
  0.42 any flip multiplies the caller's tensor/array in place (a view is flipped), so pass a copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_modules.components import check_model_source, empty_prompt_embedding
from lightning_modules.core import GeometryCore
from lightning_modules.tasks import TASKS, Task
from lightning_modules.tiny import TinySpec, build_tiny_components


def pipeline_class(task: Task) -> type[DiffusionPipeline]:
    """The stock diffusers pipeline that an exported model of `task` loads into (the task's `pipeline`)."""
    if task.pipeline is None:
        exportable = sorted(name for name, cls in TASKS.items() if cls.pipeline is not None)
        raise ValueError(f"no diffusers pipeline for task {task.name!r}; exportable: {exportable}")
    return getattr(diffusers, task.pipeline[0])


def export_scheduler(noise_scheduler: SchedulerMixin, set_alpha_to_one: bool = True) -> DDIMScheduler:
    """The DDIM inference scheduler of docs/method.md §7.2, sharing the training betas and prediction type.

    `set_alpha_to_one=True` (our default; published Marigold folders use False) makes the pipeline's final
    `prev_sample` equal the predicted x0, which is what `GeometryEstimator.predict_image` returns (docs/method.md §5.2).
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
    core: GeometryCore, source: str | None = None, tiny: TinySpec | dict[str, Any] | None = None
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Recover the text encoder and tokenizer the core dropped: loaded from `source` (a diffusers folder or hub id
    with `text_encoder/` and `tokenizer/`) or rebuilt from the `tiny` architecture. Raises unless they re-embed the
    empty prompt to `core.empty_text_embedding`."""
    if source is not None:
        check_model_source(source, ("text_encoder", "tokenizer"))
        try:
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        except OSError as error:
            raise ValueError(
                f"could not load the text encoder and tokenizer from {source!r} (expected text_encoder/ and "
                f"tokenizer/ subfolders; pass --tokenizer_source): {str(error).splitlines()[0] if str(error) else error}"
            ) from error
    elif tiny is not None:
        parts = build_tiny_components(_as_tiny_spec(tiny))
        text_encoder, tokenizer = parts.text_encoder, parts.tokenizer
    else:
        raise ValueError(
            "neither a text source nor a tiny architecture: pass tokenizer_source to recover the text encoder"
        )
    # The pipeline always embeds "" unpadded ([BOS, EOS]); a 77-token model would be conditioned differently.
    reference = core.empty_text_embedding.detach().float().cpu()
    embedding = empty_prompt_embedding(text_encoder.float().cpu().eval(), tokenizer, "none")
    if embedding.shape != reference.shape or not torch.allclose(embedding, reference, rtol=1e-4, atol=1e-5):
        detail = f"shapes {tuple(embedding.shape)} vs {tuple(reference.shape)}"
        if embedding.shape == reference.shape:
            detail = f"max difference {(embedding - reference).abs().max().item():.3g}"
        raise ValueError(
            f"the text encoder from {source or 'the tiny architecture'!r} does not reproduce the model's cached empty-prompt "
            f"embedding ({detail}); the stock pipeline embeds the unpadded 2-token prompt, so the model must use "
            "prompt_padding='none' and the text encoder it was built from (pass tokenizer_source)."
        )
    return text_encoder, tokenizer


def export_to_diffusers(
    core: GeometryCore,
    task: Task,
    out_dir: str | Path,
    processing_resolution: int = 768,
    denoising_steps: int = 1,
    tokenizer_source: str | None = None,
    tiny: TinySpec | dict[str, Any] | None = None,
    set_alpha_to_one: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the model `core` of `task` as the task's stock pipeline folder and return its path.

    The text encoder comes from `tokenizer_source` (the model's `pretrained` folder, usually) or the `tiny`
    architecture it was built from.

    Depth -> `MarigoldDepthPipeline` (affine-invariant depth in [0, 1]); normals -> `MarigoldNormalsPipeline`
    (unit normals in the training frame, x left, y up, z towards the viewer; see the module docstring). The
    scheduler (`export_scheduler`), text components and `default_*` keys are the same for both.
    The folder is written under a temporary name and renamed when complete, so a failed export leaves no mix of
    old and new files; an existing non-empty `out_dir` is refused unless `overwrite`, which replaces it whole.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty: choose another folder or pass overwrite (--overwrite)"
        )
    cls = pipeline_class(task)
    if processing_resolution % core.vae_scale_factor:
        raise ValueError(f"processing_resolution must be a multiple of {core.vae_scale_factor} (0 = native)")
    if denoising_steps < 1:
        raise ValueError(f"denoising_steps must be >= 1, got {denoising_steps}")
    text_encoder, tokenizer = text_components(core, tokenizer_source, tiny)
    pipeline = cls(
        unet=core.unet,
        vae=core.vae,
        scheduler=export_scheduler(core.noise_scheduler, set_alpha_to_one),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        default_denoising_steps=denoising_steps,
        default_processing_resolution=processing_resolution,
        **task.pipeline[1],
    )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():  # empty, or overwrite: swap the complete new folder in, then drop the old one
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, out_dir)
    return out_dir
