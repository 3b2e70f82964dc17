"""Speed switches (lightning_modules/speed.py): same numbers, the chosen implementations."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.module import GeometryEstimator
from lightning_modules.speed import ContiguousGroupNorm, SpeedSpec, adamw_options, route_group_norms
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
    for conv in (fast.core.unet.conv_in, fast.core.vae.encoder.conv_in, fast.core.vae.decoder.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(plain), loss_and_grad(fast)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


def test_contiguous_group_norm_matches_the_native_kernel_on_channels_last_bf16():
    torch.manual_seed(0)
    native = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(native.weight), torch.nn.init.normal_(native.bias)
    routed = ContiguousGroupNorm(4, 8)
    routed.load_state_dict(native.state_dict())
    x = torch.randn(2, 8, 12, 16).to(torch.bfloat16, memory_format=torch.channels_last)
    grad = torch.randn(2, 8, 12, 16).to(torch.bfloat16)
    results = []
    for norm in (native, routed):
        x_ = x.detach().requires_grad_()
        y = norm(x_)
        y.backward(grad)
        results.append((y.detach(), x_.grad, norm.weight.grad))
        norm.zero_grad()
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)  # the next conv keeps its layout
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_group_norm_route_swaps_in_place_and_back():
    model = GeometryEstimator(tiny=TinySpec(seed=0))  # contiguous_group_norm on by default
    norms = [m for m in model.core.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is ContiguousGroupNorm for m in norms)
    keys = set(model.state_dict())
    route_group_norms(model.core, contiguous=False)
    assert all(type(m) is torch.nn.GroupNorm for m in norms) and set(model.state_dict()) == keys
    plain = GeometryEstimator(tiny=TinySpec(seed=0), speed={"contiguous_group_norm": False})
    assert not any(type(m) is ContiguousGroupNorm for m in plain.core.modules())


def test_bf16_e2e_step_is_the_same_with_either_group_norm_route():
    """The VAE's attention leaves channels-last activations in the decoder, where the route applies."""
    models = [GeometryEstimator(tiny=TinySpec(seed=0), speed={"contiguous_group_norm": on}) for on in (False, True)]
    routed = []

    def spy(module, args, output):
        x = args[0]
        if x.requires_grad and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            routed.append(x.dtype)

    for norm in models[1].core.modules():
        if isinstance(norm, ContiguousGroupNorm):
            norm.register_forward_hook(spy)
    results = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grad(model))
    assert routed and set(routed) == {torch.bfloat16}
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=5e-2, atol=1e-3)


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
