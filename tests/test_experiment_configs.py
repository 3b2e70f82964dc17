"""Each paper experiment config composes to docs/method.md §3's hyperparameters and instantiates (tiny model, data)."""

from __future__ import annotations

import pytest

from experiments.__main__ import main
from experiments.batch_size import derive_accumulation
from experiments.config_defaults import expand_config_defaults
from tests.helpers import ROOT, tiny_overrides

SD2, MARIGOLD = "stabilityai/stable-diffusion-2", "prs-eth/marigold-depth-v1-0"
MARIGOLD_NORMALS = "GonzaloMG/marigold-normals"
E2E, DIFFUSION = "lightning_modules.objectives.E2EObjective", "lightning_modules.objectives.DiffusionObjective"

# config: (objective, task, pretrained, conv_in_rule, lr, weight decay, decay at, grad clip, steps, grad checkpointing)
EXPECTED = {
    "e2e_ft_depth_marigold": (E2E, "depth", MARIGOLD, None, 3e-5, 0.01, 20_000, 1.0, 20_000, True),
    "e2e_ft_depth_sd2": (E2E, "depth", SD2, "e2e_ft", 3e-5, 0.01, 20_000, 1.0, 20_000, True),
    "e2e_ft_normals_marigold": (E2E, "normals", MARIGOLD_NORMALS, None, 3e-5, 0.01, 20_000, 1.0, 20_000, True),
    "e2e_ft_normals_sd2": (E2E, "normals", SD2, "e2e_ft", 3e-5, 0.01, 20_000, 1.0, 20_000, True),
    "diffusion_depth_sd2": (DIFFUSION, "depth", SD2, "marigold", 3e-5, 0.0, 25_000, None, 30_000, False),
    "diffusion_normals_sd2": (DIFFUSION, "normals", SD2, "marigold", 6e-5, 0.0, 25_000, None, 30_000, False),
}
CONFIGS = ROOT / "configs/experiments"

# README's GPU table: GPUs -> (devices per node, nodes, micro-batch per device, accumulation), 32 samples per step
LAYOUTS = {1: (1, 1, 2, 16), 2: (2, 1, 2, 8), 4: (4, 1, 2, 4), 8: (8, 1, 2, 2), 16: (8, 2, 2, 1), 32: (8, 4, 1, 1)}
# max_steps -> GPUs -> micro-batches each device runs (steps x accumulation, worked out by hand)
MICRO_BATCHES_PER_DEVICE = {
    20_000: {1: 320_000, 2: 160_000, 4: 80_000, 8: 40_000, 16: 20_000, 32: 20_000},
    30_000: {1: 480_000, 2: 240_000, 4: 120_000, 8: 60_000, 16: 30_000, 32: 30_000},
}


def test_every_experiment_config_is_in_the_table():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_config_matches_the_recipe(tmp_path, monkeypatch, name):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    objective, task, pretrained, conv_in, lr, wd, decay_at, clip, steps, checkpointing = EXPECTED[name]
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# Paper row: ")
    cli = main(["--config", str(path), *tiny_overrides(tmp_path)], run=False)  # instantiates everything

    config = cli.parser.parse_args(expand_config_defaults(["--config", str(path)]))  # as written, not instantiated
    model = config.model.init_args
    assert config.model.class_path == "lightning_modules.module.GeometryEstimator"
    assert model.objective.class_path == objective
    assert (model.task, model.pretrained, model.lr, model.weight_decay) == (task, pretrained, lr, wd)
    assert (model.betas, model.eps, model.warmup_steps, model.decay_steps, model.final_lr_ratio) == (
        (0.9, 0.999), 1e-8, 100, decay_at, 0.01)  # fmt: skip
    assert model.gradient_checkpointing is checkpointing
    if conv_in is not None:  # a 4-channel SD2 UNet is widened by this rule; Marigold's is used as is
        assert model.conv_in_rule == conv_in
    if objective == E2E:
        assert (model.objective.init_args.noise, model.objective.init_args.timestep) == ("zeros", 999)
        assert cli.model.inference.init_latent == "zeros" and cli.model.inference.spacing == "trailing"
    else:
        assert model.objective.init_args.multi_res_noise and model.objective.init_args.annealed
        assert model.objective.init_args.noise_strength == 0.9
    trainer = config.trainer
    assert (trainer.max_steps, trainer.gradient_clip_val, trainer.precision) == (steps, clip, "bf16-mixed")
    assert config.seed_everything == 2024 and trainer.accumulate_grad_batches == 1
    assert config.batch.effective_batch_size == 32 and config.data.init_args.batch_size == 2
    assert trainer.val_check_interval == 5000  # micro-batches per device
    for gpus, (devices, nodes, micro, accumulation) in LAYOUTS.items():
        assert derive_accumulation(32, micro, devices, nodes) == accumulation, gpus
        # The run's micro-batches per device (hand-computed) are a multiple of the validation interval, so the
        # last optimiser step is validated on every GPU count (experiments.compare reads that validation).
        assert steps * accumulation == MICRO_BATCHES_PER_DEVICE[steps][gpus]
        assert MICRO_BATCHES_PER_DEVICE[steps][gpus] % trainer.val_check_interval == 0, gpus
    sources = {s.name: s.probability for s in config.data.init_args.train_sources}
    assert sources == {"hypersim": 0.9, "vkitti2": 0.1}
    assert trainer.logger.init_args.name == f"paper_{task}/{name.replace(f'_{task}', '')}"

    # The instantiated objects carry the same settings (the tiny model replaces only the weights).
    assert type(cli.model.objective).__name__ == objective.rsplit(".", 1)[1]
    assert cli.model.hparams.lr == lr and cli.model.task.name == task
    assert cli.trainer.max_steps == steps and cli.trainer.gradient_clip_val == clip
    assert cli.datamodule.batch_size == 2
