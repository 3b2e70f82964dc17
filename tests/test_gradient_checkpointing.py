"""Gradient checkpointing (on in every paper E2E config): same loss and UNet gradients as without it, and a CLI fit."""

from __future__ import annotations

import pytest
import torch

from experiments.__main__ import main
from lightning_modules.module import GeometryEstimator
from lightning_modules.objectives import DiffusionObjective, E2EObjective
from lightning_modules.tiny import TinySpec
from tests.helpers import fake_batch, tiny_run_args


def loss_and_backward(model: GeometryEstimator, batch: dict) -> tuple[torch.Tensor, dict[str, int]]:
    """Training loss and backward in train mode; how often a UNet and a VAE-decoder block ran forward."""
    calls = {"unet resnet": 0, "decoder mid block": 0}
    blocks = {
        "unet resnet": model.core.unet.down_blocks[0].resnets[0],
        "decoder mid block": model.core.vae.decoder.mid_block,
    }

    def counter(name):
        def hook(module, args):  # a pre-hook: recomputation stops once it has what backward needs
            calls[name] += 1

        return hook

    handles = [block.register_forward_pre_hook(counter(name)) for name, block in blocks.items()]
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the diffusion objective draws timesteps and noise
    loss, _ = model.objective.training_loss(model.core, model.task, batch)
    loss.backward()
    for handle in handles:
        handle.remove()
    return loss.detach(), calls


@pytest.mark.parametrize("objective", [E2EObjective(), DiffusionObjective()], ids=["e2e", "diffusion"])
def test_checkpointed_gradients_equal_plain_ones(objective):
    plain = GeometryEstimator(tiny=TinySpec(seed=0), objective=objective)
    checkpointed = GeometryEstimator(tiny=TinySpec(seed=0), objective=objective, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.core.unet.is_gradient_checkpointing and not plain.core.unet.is_gradient_checkpointing
    batch = fake_batch()

    loss_plain, calls_plain = loss_and_backward(plain, batch)
    loss_checkpointed, calls_checkpointed = loss_and_backward(checkpointed, batch)
    # Checkpointing really happened: the blocks ran again in the backward pass (the E2E loss goes through the
    # decoder with gradient; the diffusion loss never decodes).
    assert calls_plain["unet resnet"] == 1 and calls_checkpointed["unet resnet"] == 2
    decoder_runs = 1 if isinstance(objective, E2EObjective) else 0
    assert calls_plain["decoder mid block"] == decoder_runs
    assert calls_checkpointed["decoder mid block"] == 2 * decoder_runs

    torch.testing.assert_close(loss_checkpointed, loss_plain, rtol=1e-6, atol=1e-7)
    grads_plain = dict(plain.core.unet.named_parameters())
    nonzero = 0
    for name, parameter in checkpointed.core.unet.named_parameters():
        expected = grads_plain[name].grad
        assert parameter.grad is not None and expected is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-7, msg=name)
        nonzero += bool(parameter.grad.abs().sum() > 0)
    assert nonzero >= 0.9 * len(grads_plain)  # the loss reaches (nearly) every UNet tensor
    for layer in ("conv_in", "conv_out"):
        assert getattr(checkpointed.core.unet, layer).weight.grad.abs().sum() > 0, layer
    assert all(p.grad is None for p in checkpointed.core.vae.parameters())  # frozen, even when recomputed


def test_fit_with_gradient_checkpointing_through_the_cli(tmp_path, shard_cache):
    cli = main([
        "fit", *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache),
        "--model.init_args.gradient_checkpointing=true", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
    ])  # fmt: skip
    assert cli.model.core.unet.is_gradient_checkpointing and cli.model.core.vae.is_gradient_checkpointing
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # Two optimiser steps changed the UNet weights from the tiny model's initial ones.
    initial = GeometryEstimator(tiny=TinySpec(seed=0)).core.unet.state_dict()
    trained = cli.model.core.unet.state_dict()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert not torch.equal(trained["conv_out.weight"], initial["conv_out.weight"])
