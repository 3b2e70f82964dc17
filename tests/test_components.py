"""conv_in widening, empty-prompt embedding and tiny components."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from lightning_modules.components import (
    empty_prompt_embedding,
    ensure_eight_channel_unet,
    load_pretrained_components,
    looks_like_local_path,
    widen_conv_in,
)
from lightning_modules.tiny import TinySpec, build_tiny_components


def four_channel_unet() -> UNet2DConditionModel:
    config = TinySpec().unet | {"in_channels": 4}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).double()  # float64 so "exact" means 1e-12, not float32 rounding
    with torch.no_grad():
        unet.conv_in.bias.normal_()  # a zero bias would hide the difference between the two bias rules
    return unet


def test_marigold_rule_reproduces_output_when_latent_fed_twice():
    unet = four_channel_unet()
    old_conv = unet.conv_in
    latent = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    expected = old_conv(latent)
    widen_conv_in(unet, "marigold")
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    torch.testing.assert_close(unet.conv_in(torch.cat([latent, latent], dim=1)), expected, rtol=0, atol=1e-12)


def test_e2e_rule_halves_output_for_latent_and_zeros():
    unet = four_channel_unet()
    old_conv = unet.conv_in
    latent = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    expected = 0.5 * old_conv(latent)
    widen_conv_in(unet, "e2e_ft")
    widened = unet.conv_in(torch.cat([latent, torch.zeros_like(latent)], dim=1))
    torch.testing.assert_close(widened, expected, rtol=0, atol=1e-12)


def test_widened_unet_runs_and_rejects_bad_input():
    unet = four_channel_unet()
    ensure_eight_channel_unet(unet, "e2e_ft")
    context = torch.randn(1, 2, 32, dtype=torch.float64)
    out = unet(torch.randn(1, 8, 8, 8, dtype=torch.float64), 999, encoder_hidden_states=context).sample
    assert out.shape == (1, 4, 8, 8)
    ensure_eight_channel_unet(unet, "e2e_ft")  # already 8 channels: untouched
    assert unet.conv_in.in_channels == 8
    with pytest.raises(ValueError, match="4 input channels"):
        widen_conv_in(unet, "marigold")
    with pytest.raises(ValueError, match="unknown conv_in rule"):
        widen_conv_in(four_channel_unet(), "other")


def test_empty_prompt_is_two_tokens_by_default():
    parts = build_tiny_components(TinySpec())
    ids = parts.tokenizer("").input_ids
    assert ids == [parts.tokenizer.bos_token_id, parts.tokenizer.eos_token_id]
    short = empty_prompt_embedding(parts.text_encoder, parts.tokenizer)
    padded = empty_prompt_embedding(parts.text_encoder, parts.tokenizer, "max_length")
    assert short.shape == (1, 2, 32) and padded.shape == (1, 77, 32)
    assert short.dtype == torch.float32


def test_tiny_components_are_deterministic_per_seed():
    a, b, c = (build_tiny_components(TinySpec(seed=s)) for s in (3, 3, 4))
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.scheduler.config.clip_sample is False and a.scheduler.config.prediction_type == "v_prediction"


def test_unloadable_model_folder_names_the_cause(tmp_path):
    (tmp_path / "unet").mkdir()  # a subfolder without its config.json: the loader's own error is carried
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=r"the folder exists.*Cause: OSError"):
        load_pretrained_components(str(tmp_path))


def test_folder_without_a_subfolder_names_it(tmp_path):
    for name in ("unet", "text_encoder", "tokenizer"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=r"lacks vae/, scheduler/ \(expected unet/, vae/"):
        load_pretrained_components(str(tmp_path))
    (tmp_path / "file.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a diffusers model folder"):
        load_pretrained_components(str(tmp_path / "file.ckpt"))


@pytest.mark.parametrize(
    "name, local",
    [
        ("/abs/missing", True), ("./runs/x/export", True), ("~/models/marigold", True), ("runs/x/export", True),
        ("marigold", True), ("prs-eth/marigold-depth-v1-0", False), ("stabilityai/stable-diffusion-2", False),
    ],
)  # fmt: skip
def test_local_paths_are_told_from_hub_ids(name, local):
    assert looks_like_local_path(name) is local


def test_missing_local_path_is_never_tried_on_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a missing local path went to the hub")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # partly exists: "runs/x" is a local path even with one separator
    for name in (str(tmp_path / "missing"), "./runs/x/export", "runs/x", "~/surely/not/here"):
        with pytest.raises(ValueError, match="does not exist.*not tried as a hub id.*unet/, vae/, text_encoder/"):
            load_pretrained_components(name)
    with pytest.raises(AssertionError, match="went to the hub"):  # a hub id still goes to the hub
        load_pretrained_components("owner/model")
