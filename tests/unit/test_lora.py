"""LoRA families: target rule, adapters, trainability, init, per-family scales, teacher mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlightning.models.components import load_components
from dlightning.models.config import LoraConfig, ModelConfig
from dlightning.models.lora import (
    add_lora_families,
    family_parameters,
    select_lora_targets,
    set_family_scales,
    teacher_mode,
)
from dlightning.models.unet import expand_conv_in

ALL_SIX = ["default_encoder_quality", "default_decoder_quality", "default_others_quality",
           "default_encoder_consistency", "default_decoder_consistency", "default_others_consistency"]


def _unet(seed: int = 0):
    unet = load_components(ModelConfig(preset="tiny", seed=seed), parts=("unet",)).unet
    expand_conv_in(unet)
    return unet


def test_rule_on_hand_picked_names():
    names = ["conv_in.weight", "conv_in.bias", "time_embedding.linear_1.weight",
             "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight",
             "down_blocks.0.downsamplers.0.conv.weight", "mid_block.attentions.0.proj_in.weight",
             "mid_block.attentions.0.transformer_blocks.0.norm2.weight",
             "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight", "conv_norm_out.weight",
             "conv_out.weight"]
    assert select_lora_targets(names) == {
        "encoder": ["conv_in", "down_blocks.0.downsamplers.0.conv"],
        "decoder": ["up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", "conv_out"],
        "mid": ["mid_block.attentions.0.proj_in"],
    }


def test_rule_on_tiny_unet_matches_an_independent_derivation():
    unet = _unet()
    got = select_lora_targets(n for n, _ in unet.named_parameters())
    # Independent reading of the rule: every conv and linear layer except the time-embedding ones.
    expected = {"encoder": set(), "decoder": set(), "mid": set()}
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or "time_emb" in name:
            continue
        top = name.split(".")[0]
        group = {"down_blocks": "encoder", "conv_in": "encoder", "up_blocks": "decoder",
                 "conv_out": "decoder", "mid_block": "mid"}[top]
        expected[group].add(name)
    assert {g: set(v) for g, v in got.items()} == expected
    assert "conv_in" in got["encoder"] and "conv_out" in got["decoder"]


def test_six_adapters_active_and_every_lora_weight_trainable():
    unet = _unet()
    targets = add_lora_families(unet, LoraConfig())
    assert sorted(unet.active_adapters()) == sorted(ALL_SIX)
    c, d = family_parameters(unet, "consistency"), family_parameters(unet, "detail")
    assert c and d and all(p.requires_grad for _, p in c + d)
    n_modules = sum(len(v) for v in targets.values())
    assert len(c) == len(d) == 2 * n_modules  # lora_A + lora_B per target module
    lora_names = {n for n, p in unet.named_parameters() if ".lora_" in n}
    assert lora_names == {n for n, _ in c} | {n for n, _ in d}
    # the base weights were frozen by the injection and stay so
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".lora_" not in n)


def test_only_configured_groups_are_adapted():
    unet = _unet()
    add_lora_families(unet, LoraConfig(groups=["mid"]))
    assert sorted(unet.active_adapters()) == ["default_others_consistency", "default_others_quality"]
    assert all(n.startswith("mid_block.") for n, _ in family_parameters(unet, "detail"))


def test_gaussian_init_zero_b_and_a_std_one_over_rank():
    unet = _unet()
    add_lora_families(unet, LoraConfig(rank_consistency=4, rank_detail=8))
    for n, p in family_parameters(unet, "consistency") + family_parameters(unet, "detail"):
        if ".lora_B." in n:
            assert torch.count_nonzero(p) == 0, n
    layer = unet.up_blocks[0].resnets[0].conv1  # Conv2d(128, 64, 3): A has rank * 128 * 9 entries
    a_c = layer.lora_A["default_decoder_consistency"].weight
    a_d = layer.lora_A["default_decoder_quality"].weight
    assert a_c.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert a_d.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert layer.scaling["default_decoder_consistency"] == pytest.approx(8 / 4)
    assert layer.scaling["default_decoder_quality"] == pytest.approx(8 / 8)


def test_family_scales_give_base_plus_scaled_updates_on_a_linear():
    unet = _unet()
    add_lora_families(unet, LoraConfig(rank_consistency=4, rank_detail=2, alpha=8.0))
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    names = {"c": "default_others_consistency", "d": "default_others_quality"}
    with torch.no_grad():
        for name in names.values():
            layer.lora_B[name].weight.normal_()
    x = torch.randn(3, layer.in_features)
    w = layer.base_layer.weight
    base = x @ w.T + (layer.base_layer.bias if layer.base_layer.bias is not None else 0)
    a_c, b_c = layer.lora_A[names["c"]].weight, layer.lora_B[names["c"]].weight
    a_d, b_d = layer.lora_A[names["d"]].weight, layer.lora_B[names["d"]].weight
    delta_c = (8.0 / 4) * (x @ a_c.T @ b_c.T)
    delta_d = (8.0 / 2) * (x @ a_d.T @ b_d.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base + delta_c + delta_d, rtol=1e-5, atol=1e-5)
        set_family_scales(unet, consistency=1.0, detail=0.0)
        torch.testing.assert_close(layer(x), base + delta_c, rtol=1e-5, atol=1e-5)
        set_family_scales(unet, consistency=0.5, detail=2.0)
        torch.testing.assert_close(layer(x), base + 0.5 * delta_c + 2.0 * delta_d, rtol=1e-5, atol=1e-5)
        set_family_scales(unet, consistency=0.0, detail=0.0)
        torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)
    both = family_parameters(unet, "consistency") + family_parameters(unet, "detail")
    assert all(p.requires_grad for _, p in both)
    assert sorted(unet.active_adapters()) == sorted(ALL_SIX)


def test_teacher_mode_is_the_pristine_unet_and_restores_everything():
    pristine = load_components(ModelConfig(preset="tiny", seed=0), parts=("unet",)).unet
    unet = _unet(seed=0)
    add_lora_families(unet, LoraConfig())
    with torch.no_grad():
        for _, p in family_parameters(unet, "consistency") + family_parameters(unet, "detail"):
            p.normal_(std=0.1)
        unet.conv_in.base_layer.weight.mul_(1.5)  # "trained" conv_in must not leak into the teacher
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    x4, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    x8 = torch.cat([x4, x4], 1)
    with torch.no_grad():
        adapted_before = unet(x8, 1, encoder_hidden_states=ehs).sample
        with teacher_mode(unet):
            teacher = unet(x4, 1, encoder_hidden_states=ehs).sample
        adapted_after = unet(x8, 1, encoder_hidden_states=ehs).sample
        expected = pristine(x4, 1, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(teacher, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted_after, adapted_before, rtol=0, atol=0)
    assert not torch.allclose(adapted_before, expected, atol=1e-3)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert sorted(unet.active_adapters()) == sorted(ALL_SIX)


def test_teacher_mode_refuses_grad_with_checkpointing():
    unet = _unet()
    add_lora_families(unet, LoraConfig())
    unet.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="no_grad"), teacher_mode(unet):
        pass
    with torch.no_grad(), teacher_mode(unet):
        pass
