"""The authors' model.pkl layout: write from a generator, load into a fresh one, same outputs."""

from __future__ import annotations

import pytest
import torch

from dlightning.errors import MissingWeightsError
from dlightning.models.config import LoraConfig
from dlightning.models.reference_ckpt import load_reference_checkpoint, write_reference_checkpoint


def _outputs(gen, lq):
    with torch.no_grad():
        return gen(lq, gen.encode_prompts(["a", "b"])).images


def test_round_trip_gives_identical_outputs(make_generator, tiny_lq, randomize_trainables, tmp_path,
                                            monkeypatch):
    src = make_generator().eval()
    randomize_trainables(src)
    path = write_reference_checkpoint(src, tmp_path / "model.pkl")

    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    dst = make_generator().eval()
    assert not torch.allclose(_outputs(dst, tiny_lq), _outputs(src, tiny_lq), atol=1e-3)
    load_reference_checkpoint(dst, path)
    assert calls and all(c.get("weights_only") is True for c in calls)
    torch.testing.assert_close(_outputs(dst, tiny_lq), _outputs(src, tiny_lq), rtol=0, atol=0)


def test_file_has_the_reference_layout(tiny_generator, tmp_path):
    path = write_reference_checkpoint(tiny_generator, tmp_path / "model.pkl")
    ckpt = torch.load(path, weights_only=True)
    for family in ("quality", "consistency"):
        assert ckpt[f"lora_rank_unet_{family}"] == 4
        for group in ("encoder", "decoder", "others"):
            assert isinstance(ckpt[f"unet_lora_{group}_modules_{family}"], list)
    assert "conv_in" in ckpt["unet_lora_encoder_modules_quality"]
    sd = ckpt["state_dict_unet"]
    assert sd["conv_in.base_layer.weight"].shape[1] == 8
    assert "conv_in.lora_A.default_encoder_quality.weight" in sd
    assert "down_blocks.0.resnets.0.conv1.lora_B.default_encoder_consistency.weight" in sd
    assert "mid_block.resnets.0.conv1.base_layer.weight" in sd
    assert not any("teacher" in k for k in sd)
    assert any(k.startswith("spynet.") for k in ckpt["state_dict_bpp"])
    assert "cross_attn_module.threshold_fc.weight" in ckpt["state_dict_bpp"]


def test_base_weights_load_only_when_asked(make_generator, tiny_lq, randomize_trainables, tmp_path):
    src = make_generator(seed=0).eval()
    randomize_trainables(src)
    path = write_reference_checkpoint(src, tmp_path / "model.pkl")
    # same VAE / text encoder (not in the file), a UNet with different base weights
    from dlightning.models.components import load_components
    from dlightning.models.config import ModelConfig
    from dlightning.models.generator import DLoRALGenerator

    comp = load_components(ModelConfig(preset="tiny", seed=0))
    comp.unet = load_components(ModelConfig(preset="tiny", seed=1), parts=("unet",)).unet
    other = DLoRALGenerator(ModelConfig(preset="tiny", scale=4, seed=1), components=comp).eval()
    load_reference_checkpoint(other, path)
    assert not torch.allclose(_outputs(other, tiny_lq), _outputs(src, tiny_lq), atol=1e-3)
    load_reference_checkpoint(other, path, load_base_weights=True)
    torch.testing.assert_close(_outputs(other, tiny_lq), _outputs(src, tiny_lq), rtol=0, atol=0)


def test_mismatched_rank_or_groups_give_clear_errors(make_generator, tmp_path):
    path = write_reference_checkpoint(make_generator(), tmp_path / "model.pkl")
    with pytest.raises(MissingWeightsError,
                       match="lora_rank_unet_consistency=4 but model.lora.rank_consistency=2"):
        load_reference_checkpoint(make_generator(lora=LoraConfig(rank_consistency=2)), path)
    with pytest.raises(MissingWeightsError, match="unet_lora_decoder_modules"):
        load_reference_checkpoint(make_generator(lora=LoraConfig(groups=["encoder", "mid"])), path)
    with pytest.raises(MissingWeightsError, match="not found"):
        load_reference_checkpoint(make_generator(), tmp_path / "absent.pkl")
