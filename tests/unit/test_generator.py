"""The one-step generator: shapes, frame windows, timestep and x0 rule, trainable set, prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlightning.contracts.phases import PARAM_GROUPS


def test_every_frame_is_produced_with_hr_shapes(tiny_generator, tiny_lq):
    emb = tiny_generator.encode_prompts(["a", "b"])
    with torch.no_grad():
        out = tiny_generator(tiny_lq, emb)
    assert out.images.shape == (2, 3, 3, 32, 32)
    assert out.latents.shape == (2, 3, 4, 4, 4)
    assert out.images.min() >= -1 and out.images.max() <= 1 and torch.isfinite(out.images).all()
    with torch.no_grad():
        some = tiny_generator(tiny_lq, emb, targets=[1, 2])
    assert some.images.shape == (2, 2, 3, 32, 32)


def test_targets_are_independent_windows_and_frame0_uses_itself(tiny_generator, tiny_lq,
                                                                 randomize_trainables):
    randomize_trainables(tiny_generator)
    emb = tiny_generator.encode_prompts(["x", "y"])
    with torch.no_grad():
        full = tiny_generator(tiny_lq, emb)
        # frame 2 alone = window (1, 2)
        alone = tiny_generator(tiny_lq[:, 1:3], emb, targets=[1])
        # frame 0 = the second frame of the explicit window (0, 0)
        window00 = tiny_generator(torch.stack([tiny_lq[:, 0], tiny_lq[:, 0]], dim=1), emb, targets=[1])
    torch.testing.assert_close(full.images[:, 2], alone.images[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.images[:, 0], window00.images[:, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full.images[:, 0], full.images[:, 1], atol=1e-3)


def _alpha_bar(t: int) -> float:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.prod(1 - betas[: t + 1]).item()


@pytest.mark.parametrize("rule", ["residual", "epsilon"])
def test_unet_sees_t1_and_the_x0_rule_is_applied(make_generator, tiny_lq, monkeypatch, rule):
    gen = make_generator(x0_rule=rule).eval()
    emb = gen.encode_prompts(["p", "q"])
    seen = {}
    known = torch.randn(2 * 3, 4, 4, 4)

    def fake_unet(sample, timestep, encoder_hidden_states=None, **_):
        seen.update(sample=sample, timestep=timestep, ehs=encoder_hidden_states)
        return SimpleNamespace(sample=known)

    cfr_forward = gen.cfr.forward

    def recording_cfr(z_prev, z_cur, flow):
        fused, warped = cfr_forward(z_prev, z_cur, flow)
        seen.update(fused=fused, warped=warped)
        return fused, warped

    monkeypatch.setattr(gen.unet, "forward", fake_unet)
    monkeypatch.setattr(gen.cfr, "forward", recording_cfr)
    with torch.no_grad():
        out = gen(tiny_lq, emb)
    assert torch.equal(seen["timestep"], torch.ones(6, dtype=torch.long))
    torch.testing.assert_close(seen["sample"], torch.cat([seen["warped"], seen["fused"]], 1), rtol=0, atol=0)
    torch.testing.assert_close(seen["ehs"], emb.repeat_interleave(3, dim=0), rtol=0, atol=0)
    if rule == "residual":
        expected = seen["fused"] - known
    else:
        a = _alpha_bar(1)
        expected = (seen["fused"] - (1 - a) ** 0.5 * known) / a ** 0.5
    torch.testing.assert_close(out.latents.flatten(0, 1), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        decoded = gen.vae.decode(expected / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(out.images.flatten(0, 1), decoded, rtol=1e-4, atol=1e-5)


def test_lq_is_bicubic_upsampled_before_the_vae(tiny_generator, tiny_lq, monkeypatch):
    seen = {}
    encode = tiny_generator.vae.encode

    def recording_encode(x, *a, **k):
        seen["x"] = x
        return encode(x, *a, **k)

    monkeypatch.setattr(tiny_generator.vae, "encode", recording_encode)
    with torch.no_grad():
        tiny_generator(tiny_lq, tiny_generator.encode_prompts(["", ""]))
    up = torch.nn.functional.interpolate(tiny_lq.flatten(0, 1), size=(32, 32), mode="bicubic").clamp(-1, 1)
    torch.testing.assert_close(seen["x"], up, rtol=0, atol=1e-6)  # all 3 frames encoded once, in one call


def test_fresh_generator_equals_the_lora_free_model(tiny_generator, tiny_lq):
    emb = tiny_generator.encode_prompts(["a", ""])
    with torch.no_grad():
        with_lora = tiny_generator(tiny_lq, emb).images
        tiny_generator.unet.disable_adapters()
        without = tiny_generator(tiny_lq, emb).images
        tiny_generator.unet.enable_adapters()
    torch.testing.assert_close(with_lora, without, rtol=0, atol=0)  # gaussian init: every lora_B is 0


def test_trainable_set_and_parameter_groups(tiny_generator):
    gen = tiny_generator
    groups = gen.parameter_groups()
    assert tuple(groups) == PARAM_GROUPS
    names = {id(p): n for n, p in gen.named_parameters()}
    by_group = {k: {names[id(p)] for p in v} for k, v in groups.items()}
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert sum(len(v) for v in by_group.values()) == len(trainable)
    assert set().union(*by_group.values()) == trainable
    assert all(".lora_" in n and "_consistency." in n for n in by_group["c_lora"])
    assert all(".lora_" in n and "_quality." in n for n in by_group["d_lora"])
    assert by_group["conv_in"] == {"unet.conv_in.base_layer.weight", "unet.conv_in.base_layer.bias"}
    assert all(n.startswith("cfr.cross_attn_module.") for n in by_group["cfr"]) and by_group["cfr"]
    for frozen in (gen.vae, gen.prompt_encoder.text_encoder, gen.cfr.spynet):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert gen.conv_in.weight.shape[1] == 8


def test_gradients_reach_every_trainable_and_no_frozen_tensor(tiny_generator, tiny_lq, randomize_trainables):
    gen = tiny_generator.train()
    randomize_trainables(gen)
    out = gen(tiny_lq, gen.encode_prompts(["a", "b"]), targets=[1, 2])
    out.images.square().mean().backward()
    for name, params in gen.parameter_groups().items():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), name
    assert all(p.grad is None for n, p in gen.named_parameters() if not p.requires_grad)
    assert not gen.vae.training and not gen.cfr.spynet.training and gen.unet.training


def test_vae_mode_latent_is_deterministic(tiny_generator, tiny_lq):
    emb = tiny_generator.encode_prompts(["a", "b"])
    with torch.no_grad():
        a = tiny_generator(tiny_lq, emb, targets=[1]).images
        b = tiny_generator(tiny_lq, emb, targets=[1]).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prompt_cache_and_empty_prompt(tiny_generator):
    enc = tiny_generator.prompt_encoder
    first = enc.encode(["a dog", "", "a dog"])
    assert first.shape == (3, 77, 32) and not first.requires_grad
    assert enc.cache_misses == 2
    again = enc.encode(["", "a dog"])
    assert enc.cache_hits == 2 and enc.cache_misses == 2
    torch.testing.assert_close(again[1], first[0], rtol=0, atol=0)
    ids = enc.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = enc.text_encoder(ids).last_hidden_state[0]
    torch.testing.assert_close(again[0], direct, rtol=1e-5, atol=1e-6)


def test_prompt_cache_is_bounded(make_generator):
    enc = make_generator(prompt_cache_size=2).prompt_encoder
    enc.encode(["a", "b", "c"])
    assert len(enc._cache) == 2


def test_bf16_frozen_weights_under_autocast_with_checkpointing(make_generator, tiny_lq):
    gen = make_generator(gradient_checkpointing=True).train().cast_frozen(torch.bfloat16)
    for params in gen.parameter_groups().values():
        assert all(p.dtype == torch.float32 for p in params)
    assert next(gen.vae.parameters()).dtype == torch.bfloat16
    assert gen.unet.mid_block.resnets[0].conv1.base_layer.weight.dtype == torch.bfloat16
    assert gen.unet.is_gradient_checkpointing
    emb = gen.encode_prompts(["a", "b"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(tiny_lq, emb, targets=[2])
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    out.images.mean().backward()
    for params in gen.parameter_groups().values():
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_bad_inputs_are_rejected(tiny_generator, tiny_lq):
    emb = tiny_generator.encode_prompts(["a", "b"])
    with pytest.raises(ValueError, match="targets"):
        tiny_generator(tiny_lq, emb, targets=[3])
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_generator(tiny_lq[..., :7, :7], emb)
    with pytest.raises(ValueError, match="prompt_embeds"):
        tiny_generator(tiny_lq, emb[:1])


def test_teacher_context_takes_4_channel_latents(tiny_generator):
    with torch.no_grad(), tiny_generator.teacher():
        out = tiny_generator.unet(torch.randn(2, 4, 4, 4), 250,
                                  encoder_hidden_states=tiny_generator.encode_prompts(["", "a"])).sample
    assert out.shape == (2, 4, 4, 4)
    assert tiny_generator.unet.conv_in.base_layer.in_channels == 8  # restored
