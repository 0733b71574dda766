"""Stable Diffusion components: tiny preset, real loading path, missing-weight errors, conv_in surgery."""

from __future__ import annotations

import shutil

import pytest
import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.components import load_components
from dlightning.models.config import ModelConfig
from dlightning.models.unet import TEACHER_CONV_IN_WEIGHT, expand_conv_in


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_saved_tiny_loads_through_sd21_path_with_identical_weights_and_outputs(tiny_pretrained_dir):
    loaded = load_components(ModelConfig(preset="sd21", pretrained_path=str(tiny_pretrained_dir)))
    built = load_components(ModelConfig(preset="tiny", seed=0))
    for name in ("unet", "vae", "text_encoder"):
        _same_state(getattr(loaded, name), getattr(built, name))
    prompts = ["a red car, street", "", "ünïcode ☃ " * 40]
    ids_l = loaded.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ids_b = built.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids_l == ids_b and all(len(i) == 77 for i in ids_l)
    torch.testing.assert_close(loaded.alphas_cumprod, built.alphas_cumprod, rtol=0, atol=0)
    x = torch.randn(1, 4, 8, 8)
    ehs = torch.randn(1, 77, 32)
    with torch.no_grad():
        out_l = loaded.unet(x, 1, encoder_hidden_states=ehs).sample
        out_b = built.unet(x, 1, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(out_l, out_b, rtol=1e-4, atol=1e-5)  # same weights; kernels may differ


def test_tiny_is_sd_shaped():
    comp = load_components(ModelConfig(preset="tiny"))
    assert comp.vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        z = comp.vae.encode(torch.zeros(1, 3, 48, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 6, 8)  # latent is 1/8 of the image, 4 channels
    assert comp.unet.config.use_linear_projection
    assert comp.unet.config.cross_attention_dim == comp.text_encoder.config.hidden_size
    # SD 2.1 noise schedule: scaled_linear betas from 0.00085 to 0.012 over 1000 steps
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    torch.testing.assert_close(comp.alphas_cumprod, expected)
    assert comp.alphas_cumprod[1].item() == pytest.approx((1 - 0.00085) * (1 - betas[1].item()), rel=1e-6)


def test_sd21_meta_has_sd21_architecture_and_no_storage():
    comp = load_components(ModelConfig(preset="sd21_meta"), parts=("unet",))
    unet = comp.unet
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert tuple(unet.config.attention_head_dim) == (5, 10, 20, 20)
    assert unet.config.cross_attention_dim == 1024 and unet.config.layers_per_block == 2
    # published size of the SD 2.1 base UNet
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert comp.vae is None and comp.tokenizer is None


def test_unset_pretrained_path_names_the_key():
    with pytest.raises(MissingWeightsError, match=r"model\.pretrained_path"):
        load_components(ModelConfig(preset="sd21", pretrained_path=None))


def test_absent_folder_names_the_key(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"model\.pretrained_path.*not a folder"):
        load_components(ModelConfig(preset="sd21", pretrained_path=str(tmp_path / "nope")))


def test_incomplete_folder_lists_every_missing_part(tiny_pretrained_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_pretrained_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    for f in (broken / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(MissingWeightsError) as err:
        load_components(ModelConfig(preset="sd21", pretrained_path=str(broken)))
    msg = str(err.value)
    for part in ("model.pretrained_path", "vae/", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "tokenizer/", "stable-diffusion-2-1-base"):
        assert part in msg
    missing_list = msg.split("missing:")[1].split(". Put")[0]
    assert "text_encoder" not in missing_list  # present parts are not reported


def _tiny_unet():
    return load_components(ModelConfig(preset="tiny"), parts=("unet",)).unet


@pytest.mark.parametrize("bias", ["pretrained", "random"])
def test_expand_conv_in_copies_the_pretrained_kernel_into_both_halves(bias):
    unet = _tiny_unet()
    w0, b0 = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    conv = expand_conv_in(unet, bias=bias)
    assert unet.conv_in is conv and conv.in_channels == 8 and unet.config.in_channels == 8
    torch.testing.assert_close(conv.weight[:, :4], w0, rtol=0, atol=0)
    torch.testing.assert_close(conv.weight[:, 4:], w0, rtol=0, atol=0)  # not halved (parity)
    if bias == "pretrained":
        torch.testing.assert_close(conv.bias, b0, rtol=0, atol=0)
    else:
        assert not torch.equal(conv.bias, b0)
        bound = 1 / (8 * 9) ** 0.5  # PyTorch's default init of a Conv2d(8, C, 3) bias
        assert conv.bias.abs().max() <= bound
    # pristine kernel kept for the teacher, outside the state dict
    torch.testing.assert_close(getattr(unet, TEACHER_CONV_IN_WEIGHT), w0, rtol=0, atol=0)
    assert not any("teacher" in k for k in unet.state_dict())


def test_expanded_conv_in_responds_to_two_equal_latents_like_twice_the_pretrained_conv():
    unet = _tiny_unet()
    old = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    conv = expand_conv_in(unet, bias="pretrained")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = 2 * old(x) - old.bias[None, :, None, None]
        torch.testing.assert_close(conv(torch.cat([x, x], 1)), expected, rtol=1e-5, atol=1e-5)
