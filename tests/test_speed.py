"""Speed switches (lightning_modules/speed.py): same numbers, the chosen implementations."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.module import GeometryEstimator
from lightning_modules.speed import SpeedSpec, adamw_options
from lightning_modules.tiny import TinySpec
from tests.helpers import fake_batch


def loss_and_grad(model: GeometryEstimator) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model.zero_grad()
    loss, _ = model.objective.training_loss(model.core, model.task, fake_batch())
    loss.backward()
    return loss.detach(), model.core.unet.conv_in.weight.grad.clone()


def test_channels_last_gives_the_same_loss_and_gradients():
    plain = GeometryEstimator(tiny=TinySpec(seed=0))
    fast = GeometryEstimator(tiny=TinySpec(seed=0), speed=SpeedSpec(channels_last=True))
    assert fast.core.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(plain), loss_and_grad(fast)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "for_loop"])
def test_optimizer_implementations_step_alike(impl):
    reference = GeometryEstimator(tiny=TinySpec(seed=0), speed={"optimizer_impl": "for_loop"})
    model = GeometryEstimator(tiny=TinySpec(seed=0), speed={"optimizer_impl": impl})
    results = []
    for m in (reference, model):
        optimizer = m.configure_optimizers()["optimizer"]
        loss_and_grad(m)
        optimizer.step()
        results.append(m.core.unet.conv_in.weight.detach().clone())
        defaults = optimizer.defaults
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)
    expected = {"auto": "foreach", "fused": "fused", "foreach": "foreach", "for_loop": None}[impl]
    assert (defaults.get("fused") is True) == (expected == "fused")
    assert (defaults.get("foreach") is True) == (expected == "foreach")
    assert adamw_options([torch.nn.Parameter(torch.zeros(1))], "auto") == {"foreach": True}


def test_bad_switches_are_refused():
    with pytest.raises(ValueError, match="optimizer_impl"):
        SpeedSpec(optimizer_impl="sgd")
    with pytest.raises(ValueError, match="attention_backend"):
        SpeedSpec(attention_backend="xformers")


def test_the_unet_attention_runs_through_sdpa():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = GeometryEstimator(tiny=TinySpec(seed=0))
    processors = model.core.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_encode_leaves_no_inference_tensor_in_a_training_graph():
    model = GeometryEstimator(tiny=TinySpec(seed=0)).train()
    z = model.core.encode(fake_batch()["rgb"])
    assert not z.is_inference() and not z.requires_grad
    with torch.no_grad():
        assert model.core.encode(fake_batch()["rgb"]).is_inference()  # no copy where no graph is built


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    eager = GeometryEstimator(tiny=TinySpec(seed=0)).eval()
    compiled = GeometryEstimator(tiny=TinySpec(seed=0), speed=SpeedSpec(compile_unet=True)).eval()
    x = fake_batch()["rgb"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.predict_image(x), eager.predict_image(x), rtol=1e-4, atol=1e-5)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # nn.Module.compile keeps the keys
